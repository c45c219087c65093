# Hierarchical auxiliary over-parameterisation with a hand-picked structure, on
# the compact digits U-Net: the searched config's network A with the C -> A
# connections fixed to the decoder path -- the bottleneck (1/16) and the
# decoder at 1/8 and 1/4 -- so A starts at the bottleneck. Training as in
#   projects/digits/configs/aux/auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py
_base_ = './auxh-w2-search_unet-s4-d16-c16-fcn_1xb16-800i_digits-seg-64x64.py'

model = dict(search=None, structure=['backbone[0]', 'backbone[1]', 'backbone[2]'])
