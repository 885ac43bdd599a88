"""Strategies: how a backbone's outputs become one L2-normalised embedding per image.

A strategy name is ``<Style><Backbone>[@<preprocessing>]``, e.g. ``ComplexB16``, ``SimpleS8@full``, ``GemB16``,
``SimpleS14`` (DINOv2). Styles, after DINO's evaluation scripts:

- ``Simple`` (eval_knn.py): the final normed [CLS] token.
- ``Complex`` (eval_linear.py): the normed [CLS] tokens of the last ``n_last_blocks`` blocks, concatenated,
  plus with ``avgpool`` the mean of the last block's normed patch tokens, in the official layout (for n=1,
  [CLS] and mean interleaved channel by channel). Small backbones: n=4, no avgpool; Base/Large: n=1, avgpool.
- ``Gem`` (eval_copy_detection.py): the final normed [CLS] token and the GeM-pooled (p=4) patch tokens.
- ``MultiScale`` (eval_knn.py, multi-scale): the mean of the Simple features at scales 1, 1/sqrt(2) and 1/2.

A style declares what it reads from a forward pass (``Needs``), so that one pass per backbone and scale serves
every requested strategy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .backbones import BACKBONES, Backbone, get_backbone
from .preprocess import DEFAULT_PREPROCESSING, PREPROCESSINGS, Preprocessing, get_preprocessing

if TYPE_CHECKING:  # torch is imported where features are pooled, not to parse names (a small gunicorn master)
    import torch

    from .vit import BackboneOutput

DEFAULT_STRATEGY = "ComplexB16"
# the eight of the original work: both styles on each DINO backbone
ORIGINAL_STRATEGIES = tuple(f"{style}{b}" for b in ("S16", "S8", "B16", "B8") for style in ("Simple", "Complex"))


class UnknownStrategy(ValueError):
    """A strategy name that does not parse or names something we do not have."""


@dataclass(frozen=True)
class Needs:
    """At scale 1, the [CLS] tokens of the last ``n_last_blocks`` blocks and, if ``patch_tokens``, the last
    block's patch tokens; at the other ``scales``, the final [CLS] token only."""

    n_last_blocks: int = 1
    patch_tokens: bool = False
    scales: tuple[float, ...] = (1.0,)

    def merge(self, other: Needs) -> Needs:
        scales = tuple(sorted(set(self.scales) | set(other.scales), reverse=True))
        return Needs(max(self.n_last_blocks, other.n_last_blocks), self.patch_tokens or other.patch_tokens, scales)


class Style:
    """A pooling of backbone outputs: ``summary`` says what it computes in the DINO papers' terms, ``plain``
    the same for people who never read them; by default it reads the final [CLS] token alone."""

    name = summary = plain = ""

    def describe(self, params: dict) -> str:
        return self.summary

    def describe_plain(self, params: dict) -> str:
        return self.plain

    def default_params(self, backbone: Backbone) -> dict:
        return {}

    def validate_params(self, params: dict, backbone: Backbone) -> dict:
        """Parameters from a manifest: the defaults' keys, each of its default's type (an int for a float)."""
        expected = self.default_params(backbone)
        if set(params) != set(expected):
            raise ValueError(f"{self.name} parameters must be {sorted(expected)}, got {sorted(params)}")
        out = {}
        for key, default in expected.items():
            value = float(params[key]) if isinstance(default, float) and type(params[key]) is int else params[key]
            if type(value) is not type(default):
                raise ValueError(f"{self.name} parameter {key}={value!r} should be like {default!r}")
            out[key] = value
        return out

    def needs(self, params: dict) -> Needs:
        return Needs()

    def dim(self, backbone: Backbone, params: dict) -> int:
        return backbone.dim

    def pool(self, outputs: dict[float, BackboneOutput], params: dict) -> torch.Tensor:
        """(B, dim) features, before L2 normalisation."""
        return outputs[1.0].cls[:, -1]


class Simple(Style):
    name = "Simple"
    summary = "final normed [CLS] token (DINO eval_knn)"
    plain = "the model's overall impression of the picture"


class Complex(Style):
    name = "Complex"

    def describe(self, params: dict) -> str:
        n = params["n_last_blocks"]
        mean = " + mean patch token" if params["avgpool_patchtokens"] else ""
        return f"[CLS] of {'the last block' if n == 1 else f'the last {n} blocks'}{mean} (DINO eval_linear)"

    def describe_plain(self, params: dict) -> str:
        n = params["n_last_blocks"]
        seen = "the model's overall impression" if n == 1 else f"the overall impression at the model's last {n} layers"
        return seen + (", plus the average of every part of the picture" if params["avgpool_patchtokens"] else "")

    def default_params(self, backbone: Backbone) -> dict:
        small = backbone.arch == "S"
        return {"n_last_blocks": 4 if small else 1, "avgpool_patchtokens": not small}

    def validate_params(self, params: dict, backbone: Backbone) -> dict:
        params = super().validate_params(params, backbone)
        if not 1 <= params["n_last_blocks"] <= backbone.config.depth:
            raise ValueError(f"n_last_blocks must be in 1..{backbone.config.depth}")
        return params

    def needs(self, params: dict) -> Needs:
        return Needs(params["n_last_blocks"], params["avgpool_patchtokens"])

    def dim(self, backbone: Backbone, params: dict) -> int:
        return backbone.dim * (params["n_last_blocks"] + int(params["avgpool_patchtokens"]))

    def pool(self, outputs: dict[float, BackboneOutput], params: dict) -> torch.Tensor:
        import torch

        out, n = outputs[1.0], params["n_last_blocks"]
        feats = out.cls[:, -n:].reshape(out.cls.shape[0], -1)  # torch.cat([x[:, 0] for x in layers], -1)
        if not params["avgpool_patchtokens"]:
            return feats
        mean = out.patch.mean(dim=1)
        if n == 1:  # the official layout: channels of [CLS] and mean interleaved
            return torch.stack((feats, mean), dim=-1).reshape(feats.shape[0], -1)
        return torch.cat((feats, mean), dim=-1)  # the official code has n=1 only; beyond it, concatenated


class Gem(Style):
    name = "Gem"
    summary = "[CLS] + GeM-pooled patch tokens, p=4 (DINO copy detection)"
    plain = "the overall impression plus the most striking details (made to spot copies)"

    def default_params(self, backbone: Backbone) -> dict:
        return {"gem_p": 4.0}

    def needs(self, params: dict) -> Needs:
        return Needs(1, True)

    def dim(self, backbone: Backbone, params: dict) -> int:
        return 2 * backbone.dim

    def pool(self, outputs: dict[float, BackboneOutput], params: dict) -> torch.Tensor:
        import torch

        out, p = outputs[1.0], params["gem_p"]
        return torch.cat((out.cls[:, -1], out.patch.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)), dim=-1)


class MultiScale(Style):
    name = "MultiScale"
    summary = "mean of Simple features at scales 1, 1/sqrt(2), 1/2 (DINO multi-scale kNN)"

    def describe_plain(self, params: dict) -> str:
        sizes = ", ".join(f"{s:.0%}" for s in params["scales"])
        return f"the overall impression, averaged over the picture at {sizes} of its size"

    def default_params(self, backbone: Backbone) -> dict:
        return {"scales": [1.0, 1 / math.sqrt(2), 0.5]}

    def validate_params(self, params: dict, backbone: Backbone) -> dict:
        scales = [float(s) for s in super().validate_params(params, backbone)["scales"]]
        if not scales or any(not 0 < s <= 1 for s in scales) or 1.0 not in scales:
            raise ValueError("scales must be in (0, 1] and include 1.0")
        return {"scales": scales}

    def needs(self, params: dict) -> Needs:
        return Needs(1, False, tuple(params["scales"]))

    def pool(self, outputs: dict[float, BackboneOutput], params: dict) -> torch.Tensor:
        import torch

        return torch.stack([outputs[s].cls[:, -1] for s in params["scales"]]).mean(dim=0)


_MODEL_SIZES = {"S": "Small", "B": "Medium", "L": "Large"}
_FRAMINGS = {"dino": "middle of the banner only", "square": "whole banner, squeezed square", "full": "whole banner"}
STYLES: dict[str, Style] = {s.name: s for s in (Simple(), Complex(), Gem(), MultiScale())}
_NAME_RE = re.compile(r"^(?P<style>[A-Z][A-Za-z]*?)(?P<backbone>[SBL](?:16|14|8))(?:@(?P<prep>[a-z]+))?$")


@dataclass(frozen=True)
class Strategy:
    name: str
    style: Style = field(compare=False)
    backbone: Backbone
    preprocessing: Preprocessing
    params: dict = field(hash=False)

    @property
    def dim(self) -> int:
        return self.style.dim(self.backbone, self.params)

    @property
    def attention_name(self) -> str:
        """Where its attention maps sit among an Extractor's features (made with ``attention=True``)."""
        return f"{self.name}:attention"

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches in the preprocessed input: the shape of its attention maps."""
        (h, w), p = self.preprocessing.output_size, self.backbone.patch_size
        return h // p, w // p

    @property
    def needs(self) -> Needs:
        return self.style.needs(self.params)

    @property
    def group(self) -> tuple[str, Preprocessing]:
        """Strategies of one group share their forward passes: same backbone, same input tensors."""
        return (self.backbone.code, self.preprocessing)

    def pool(self, outputs: dict[float, BackboneOutput]) -> torch.Tensor:
        """(B, dim) L2-normalised float32 features."""
        import torch.nn.functional as F

        return F.normalize(self.style.pool(outputs, self.params).float(), dim=-1)

    def describe(self) -> str:
        prep = "" if self.preprocessing.name == DEFAULT_PREPROCESSING else f", {self.preprocessing.name} preprocessing"
        return f"{self.backbone.label}, {self.style.describe(self.params)}{prep}"

    def describe_plain(self) -> str:
        """One line for people: what it looks at, with which model, on which part of the banner."""
        b = self.backbone
        model = f"{_MODEL_SIZES.get(b.arch, b.arch)} {'DINOv2' if b.family == 'dinov2' else 'DINO'} model"
        framing = _FRAMINGS.get(self.preprocessing.name, f"{self.preprocessing.name} framing")
        what = self.style.describe_plain(self.params)
        return f"{what[:1].upper()}{what[1:]}. {model}, {b.patch_size}-pixel squares, {framing}."

    def to_manifest(self) -> dict:
        """Everything needed to embed a query the same way (the builder adds the checkpoint file and sha256)."""
        return {
            "style": self.style.name,
            "backbone": self.backbone.code,
            "backbone_label": self.backbone.label,
            "dim": self.dim,
            "params": dict(self.params),
            "preprocessing": self.preprocessing.to_manifest(),
        }

    @classmethod
    def from_manifest(cls, name: str, entry: dict) -> Strategy:
        """The strategy exactly as recorded (not as today's defaults would make it); validated."""
        try:
            style, backbone = STYLES[entry["style"]], get_backbone(entry["backbone"])
            params = style.validate_params(dict(entry.get("params", {})), backbone)
            strategy = cls(name, style, backbone, Preprocessing.from_manifest(entry["preprocessing"]), params)
        except KeyError as e:
            raise ValueError(f"strategy {name!r}: manifest entry lacks or has an unknown {e}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"strategy {name!r}: {e}") from None
        (h, w), p = strategy.preprocessing.output_size, backbone.patch_size
        if h % p or w % p:
            raise ValueError(f"strategy {name!r}: input {w}x{h} is not a multiple of the patch size {p}")
        if int(entry.get("dim", -1)) != strategy.dim:
            raise ValueError(f"strategy {name!r}: manifest dim {entry.get('dim')} != {strategy.dim}")
        return strategy


def _hint() -> str:
    return (
        f"valid names are <Style><Backbone>[@<preprocessing>] with Style in {', '.join(STYLES)}, "
        f"Backbone in {', '.join(BACKBONES)}, preprocessing in {', '.join(PREPROCESSINGS)} "
        f"(default {DEFAULT_PREPROCESSING}); e.g. {', '.join(ORIGINAL_STRATEGIES)}"
    )


def parse_strategy(name: str) -> Strategy:
    """A strategy from its name, with today's default parameters; UnknownStrategy if invalid."""
    m = _NAME_RE.match(name or "")
    if not m or m["style"] not in STYLES or m["backbone"] not in BACKBONES:
        raise UnknownStrategy(f"unknown strategy {name!r}: {_hint()}")
    prep = m["prep"] or DEFAULT_PREPROCESSING
    if prep not in PREPROCESSINGS:
        raise UnknownStrategy(f"unknown preprocessing {prep!r} in {name!r}: {_hint()}")
    style, backbone = STYLES[m["style"]], BACKBONES[m["backbone"]]
    canonical = f"{style.name}{backbone.code}" + ("" if prep == DEFAULT_PREPROCESSING else f"@{prep}")
    return Strategy(canonical, style, backbone, get_preprocessing(prep), style.default_params(backbone))


def parse_strategies(spec: str) -> list[Strategy]:
    """A comma-separated list, or ``all`` for the eight original strategies; duplicates removed."""
    names = ORIGINAL_STRATEGIES if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UnknownStrategy(f"no strategy given: {_hint()}")
    return list(dict.fromkeys(map(parse_strategy, names)))
