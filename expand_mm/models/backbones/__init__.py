"""Small compact backbones (registered in MMEngine's root ``MODELS``)."""
from .yolo_lite import YOLOLite

__all__ = ['YOLOLite']
