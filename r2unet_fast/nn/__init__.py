"""Modules of the model: recurrent conv, the four blocks, attention gate, the U-Nets."""
from .attention import AttentionGate
from .blocks import BLOCKS, ConvBlock, ConvBNReLU, ResidualBlock, RRCUBlock, make_block
from .recurrent import RecurrentConv
from .unet import R2AttUNet, R2UNet, UpConv, backend_report, set_backend

__all__ = ["AttentionGate", "BLOCKS", "ConvBlock", "ConvBNReLU", "ResidualBlock", "RRCUBlock", "make_block",
           "RecurrentConv", "R2AttUNet", "R2UNet", "UpConv", "backend_report", "set_backend"]
