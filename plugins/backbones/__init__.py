"""Built-in backbones: torchvision ResNets (with a CIFAR stem for small inputs) and a small ResNet.

A backbone plugin is a callable ``(*, in_channels, image_size, **options)`` returning an
``nn.Module`` that maps [B, C, H, W] to [B, feature_dim] and has a ``feature_dim`` attribute.
"""

from suncet.plugins.backbones import resnet  # noqa: F401  (registers the plugins)
