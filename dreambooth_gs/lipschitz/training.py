"""Training and evaluation of LipConvnet: datasets (image folder, CIFAR-100, synthetic), the step with optional
certificate regularisation, certified accuracy, and safetensors checkpoints. No argparse: the script wires these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .functional import certified_accuracy, certified_radius
from .lipconvnet import LipConvnet

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
# One std for every channel (SOC's choice): normalisation then scales pixels by 1/std, so a 1-Lipschitz network is
# (1/std)-Lipschitz in pixel space and certificates divide by that constant.
INPUT_STD = 0.2507
CHECKPOINT_FORMAT = "lipconvnet-v1"


def pixel_lipschitz(std: float = INPUT_STD) -> float:
    """Lipschitz constant of normalisation followed by a 1-Lipschitz network, in pixel ([0, 1]) units."""
    return 1.0 / std


def image_transforms(input_size: int, train: bool, mean=CIFAR100_MEAN, std: float = INPUT_STD):
    """torchvision transforms: resize/crop to ``input_size`` (random crop with 4-pixel padding + flip for training)."""
    from torchvision import transforms

    steps = [transforms.Resize(input_size), transforms.CenterCrop(input_size)]
    if train:
        steps += [transforms.RandomCrop(input_size, padding=4), transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, (std,) * len(mean))]
    return transforms.Compose(steps)


def image_folder_dataset(root: str | Path, input_size: int, train: bool) -> Dataset:
    """A CIFAR-style folder in ImageFolder layout: ``root/<class name>/<image>``, one subfolder per class."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist; pass a folder with one subfolder of images per class")
    if not any(child.is_dir() for child in root.iterdir()):
        raise ValueError(f"dataset folder {root} has no class subfolders; expected {root}/<class name>/<image files>")
    return ImageFolder(str(root), transform=image_transforms(input_size, train))


def cifar100_dataset(root: str | Path, train: bool, download: bool) -> Dataset:
    """torchvision's CIFAR-100 under ``root`` (downloaded there first if ``download`` and the network allows)."""
    from torchvision.datasets import CIFAR100

    try:
        return CIFAR100(str(root), train=train, download=download, transform=image_transforms(32, train))
    except (RuntimeError, OSError) as error:
        hint = "" if download else "; add --download to fetch it"
        raise ValueError(f"CIFAR-100 is not available under {root} ({error}){hint}") from None


def synthetic_dataset(num_samples: int, num_classes: int, input_size: int, seed: int = 0) -> Dataset:
    """Random normalised images and labels, for smoke runs without data."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(num_samples, 3, input_size, input_size, generator=generator)
    images = (pixels - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)) / INPUT_STD
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return TensorDataset(images, labels)


def num_classes_of(dataset: Dataset) -> int:
    """Class count of an ImageFolder / CIFAR dataset (``classes``) or a labelled TensorDataset."""
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(dataset.tensors[1].max()) + 1


def make_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SOC's recipe: SGD with momentum, learning rate divided by 10 at 1/2 and 3/4 of training."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = [max(1, total_steps // 2), max(1, (3 * total_steps) // 4)]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def certificate_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, lipschitz: float) -> torch.Tensor:
    """Cross-entropy minus ``gamma`` times the mean positive certified radius (SOC's certificate regulariser)."""
    loss = F.cross_entropy(logits, labels)
    if gamma:
        loss = loss - gamma * F.relu(certified_radius(logits, lipschitz)).mean()
    return loss


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    gamma: float = 0.0,
    lipschitz: float = 1.0,
) -> dict[str, float]:
    """One optimisation step; returns the loss and the batch accuracy."""
    model.train()
    logits = model(images)
    loss = certificate_loss(logits, labels, gamma, lipschitz)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}


def _batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches forever (epoch after epoch), on ``device``."""
    while True:
        for images, labels in loader:
            yield images.to(device), labels.to(device)


def fit(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    steps: int,
    device: torch.device,
    gamma: float = 0.0,
    lipschitz: float = 1.0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """``steps`` training steps with a tqdm bar; returns the per-step logs."""
    logs = []
    bar = tqdm(total=steps, desc="train", disable=not progress, dynamic_ncols=True)
    for _, (images, labels) in zip(range(steps), _batches(loader, device)):
        logs.append(train_step(model, images, labels, optimizer, gamma, lipschitz))
        scheduler.step()
        bar.update(1)
        bar.set_postfix(loss=f"{logs[-1]['loss']:.3f}", acc=f"{logs[-1]['accuracy']:.2f}")
    bar.close()
    return logs


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, lipschitz: float = 1.0, radius: float = 36 / 255
) -> dict[str, float]:
    """Loss, accuracy and certified robust accuracy at l2 ``radius`` (eval mode: 12 series terms)."""
    model.eval()
    logits, labels = [], []
    for images, batch_labels in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(batch_labels)
    logits, labels = torch.cat(logits), torch.cat(labels)
    accuracy, robust = certified_accuracy(logits, labels, radius, lipschitz)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": accuracy,
        "certified_accuracy": robust,
        "radius": radius,
        "samples": len(labels),
    }


def save_checkpoint(model: LipConvnet, path: str | Path, extra: dict | None = None) -> Path:
    """Weights (and the power-iteration vectors) as safetensors, the model config as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(model.config), "extra": json.dumps(extra or {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LipConvnet:
    """A LipConvnet rebuilt from a :func:`save_checkpoint` file (strict: every tensor must match by name)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a LipConvnet checkpoint (format {metadata.get('format')!r})")
    config = json.loads(metadata["config"])
    if config.get("groups") is not None:
        config["groups"] = tuple(config["groups"])
    with torch.device("meta"):  # no initialisation work: every tensor comes from the file
        model = LipConvnet(**config)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True, assign=True)
    return model
