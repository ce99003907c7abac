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
        return {"torchvision": f"model = torchvision.models.{self.arch}(){stem}",
                "timm": f"model = timm.create_model('{self.arch}'){stem}"}

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
    *, in_channels: int, image_size: int, width: Annotated[int, Range(1, 4096)] = 32, blocks: Annotated[int, Range(1, 64)] = 1
) -> SmallResNet:
    if width < 1 or blocks < 1:
        raise ConfigError(f"small_resnet needs width >= 1 and blocks >= 1, got width={width}, blocks={blocks}")
    return SmallResNet(in_channels, image_size, width, blocks)
