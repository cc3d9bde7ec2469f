"""The paper's models: CIFAR 6n+2 ResNets and plain nets, ImageNet ResNet-18...152, pre-activation units."""
from . import cifar, imagenet  # noqa: F401  (registers the models)
from .blocks import SHORTCUT_OPTIONS, UNITS, ResidualBlock, ZeroPadShortcut
from .flops import count_multiply_adds, count_parameters
from .registry import create_model, is_model, list_models, register_model
from .resnet import ResNet

__all__ = ["create_model", "list_models", "is_model", "register_model", "ResNet", "ResidualBlock",
           "ZeroPadShortcut", "SHORTCUT_OPTIONS", "UNITS", "count_parameters", "count_multiply_adds"]
