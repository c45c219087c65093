# Hierarchical auxiliary over-parameterisation with a hand-picked structure, on
# the compact digits YOLO-LITE-style detector: the searched config's network A
# (twice as wide, one block per backbone and neck map, a YOLOv3 head of twice
# the width) with the C -> A connections fixed to the backbone's two deepest
# maps (strides 16 and 32) and the neck's stride-32 map. Training as in
#   projects/digits/configs/aux/auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64.py
_base_ = './auxh-w2-search_yolo-lite_1xb16-900i_digits-det-64x64.py'

model = dict(search=None, structure=['backbone[1]', 'backbone[2]', 'neck[0]'])
