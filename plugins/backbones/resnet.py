"""ResNets from torchvision, plus a narrow ResNet for 8x8-32x32 images on a CPU."""

from __future__ import annotations

from typing import Annotated

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from suncet.errors import ConfigError
from suncet.registry import Range, register_backbone


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its classifier; optionally with a 3x3 stride-1 stem and no
    max-pool (the CIFAR stem), which small inputs need to keep their spatial detail."""

    def __init__(self, arch: str, in_channels: int, cifar_stem: bool):
        super().__init__()
        self.arch, self.in_channels, self.cifar_stem = arch, in_channels, cifar_stem
        net = getattr(torchvision.models, arch)(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def equivalents(self) -> dict[str, str]:
        """How to build this network in torchvision and in timm (`suncet export --format`); timm's
        ResNets name their weights as torchvision's do, so one state_dict serves both."""
        if self.cifar_stem:
            stem = f"; model.conv1 = torch.nn.Conv2d({self.in_channels}, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()"
        elif self.in_channels != 3:
            stem = f"; model.conv1 = torch.nn.Conv2d({self.in_channels}, 64, 7, 2, 3, bias=False)"
        else:
            stem = ""
        return {
            "torchvision": f"model = torchvision.models.{self.arch}(){stem}",
            "timm": f"model = timm.create_model('{self.arch}'){stem}",
        }

    def equivalent_state_dict(self) -> dict[str, Tensor]:
        return self.net.state_dict()  # fc is an Identity here: the library's classifier stays unset


def _cifar_stem(option: bool | None, image_size: int) -> bool:
    return image_size <= 64 if option is None else bool(option)


@register_backbone("resnet18", description="torchvision ResNet-18 (CIFAR stem for inputs <= 64 px unless set)")
def resnet18(*, in_channels: int, image_size: int, cifar_stem: bool | None = None) -> TorchvisionResNet:
    return TorchvisionResNet("resnet18", in_channels, _cifar_stem(cifar_stem, image_size))


@register_backbone("resnet50", description="torchvision ResNet-50 (CIFAR stem for inputs <= 64 px unless set)")
def resnet50(*, in_channels: int, image_size: int, cifar_stem: bool | None = None) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", in_channels, _cifar_stem(cifar_stem, image_size))


class SmallResNet(nn.Module):
    """3x3 stem, then one torchvision BasicBlock per stage, doubling the width and halving the
    resolution from stage to stage while the feature map is larger than 2x2."""

    def __init__(self, in_channels: int, image_size: int, width: int, blocks: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        channels, size = width, image_size
        for stage in range(4):
            out = width * 2**stage
            stride = 1 if stage == 0 or size <= 2 else 2
            for b in range(blocks):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or channels != out:
                    down = nn.Sequential(nn.Conv2d(channels, out, 1, stride=s, bias=False), nn.BatchNorm2d(out))
                layers.append(BasicBlock(channels, out, stride=s, downsample=down))
                channels = out
            size = (size + stride - 1) // stride
            if stage == 2 and image_size <= 16:
                break  # an 8-16 px input is at 2-4 px here; a fourth stage adds width, not context
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_backbone("small_resnet", description="narrow ResNet for 8-32 px inputs on a CPU (width, blocks)")
def small_resnet(
    *,
    in_channels: int,
    image_size: int,
    width: Annotated[int, Range(1, 4096)] = 32,
    blocks: Annotated[int, Range(1, 64)] = 1,
) -> SmallResNet:
    if width < 1 or blocks < 1:
        raise ConfigError(f"small_resnet needs width >= 1 and blocks >= 1, got width={width}, blocks={blocks}")
    return SmallResNet(in_channels, image_size, width, blocks)


class _WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet: BN-LeakyReLU-conv3x3, BN-LeakyReLU-conv3x3, plus a
    1x1 projection of the activated input where the shape changes."""

    def __init__(self, channels: int, out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(out), nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        self.shortcut = None if channels == out and stride == 1 else nn.Conv2d(channels, out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.act(self.bn1(x))
        out = self.conv2(self.act(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32 px inputs (Zagoruyko and Komodakis), as PAWS and FixMatch use it on
    CIFAR-10: three groups of (depth - 4) / 6 blocks, 16 x widen, 32 x widen, 64 x widen channels."""

    def __init__(self, in_channels: int, depth: int, widen: int):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        channels = widths[0]
        for group, out in enumerate(widths[1:]):
            for b in range(blocks):
                layers.append(_WideBlock(channels, out, 2 if group > 0 and b == 0 else 1))
                channels = out
        layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_backbone("wide_resnet", description="wide ResNet for 32 px inputs, WRN-28-2 by default (depth, widen)")
def wide_resnet(
    *,
    in_channels: int,
    image_size: int,
    depth: Annotated[int, Range(10, 100)] = 28,
    widen: Annotated[int, Range(1, 16)] = 2,
) -> WideResNet:
    if (depth - 4) % 6:
        raise ConfigError(f"wide_resnet needs depth = 6 n + 4 (10, 16, 22, 28, ...), got {depth}")
    return WideResNet(in_channels, depth, widen)
