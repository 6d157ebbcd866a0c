"""Architecture registry: every network is built from a small config ``{"arch": id, "args": {...}}``.

Networks register themselves with :func:`register`; :func:`build` turns a config (as stored in a
checkpoint, a training config or the model manifest) into a ``torch.nn.Module``. :func:`get` and
:func:`build` import only the module of the architecture asked for, :func:`architectures` every module
(``_load_all.py`` says which module registers which id).

Contract every registered network follows (the predictor, the losses and training rely on it):

- input ``(N, C_in, *spatial)`` float32, already intensity-normalised as the checkpoint's input spec says;
- in ``eval()`` mode ``forward`` returns one tensor of **logits** ``(N, C_out, *spatial)`` at input size;
  ``C_out == 1`` means sigmoid/binary, ``C_out >= 2`` means softmax over classes (0 = background);
- in ``train()`` mode a deeply supervised network returns a list ``[full_res, lower_res, ...]`` of logits,
  the first at input size;
- builder keywords ``in_channels``/``out_channels`` where the architecture allows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_ARCHITECTURES: dict[str, "Architecture"] = {}


@dataclass(frozen=True)
class Architecture:
    arch_id: str
    builder: Callable[..., Any]
    dims: tuple[int, ...]          # spatial dimensionalities the network supports: (2,), (3,) or (2, 3)
    paper: str                     # citation key(s) of the method (models/citations.py), e.g. "wang_hybrid_encoder"
    summary: str
    tiny_args: dict[str, Any]      # a small, fast configuration for tests and smoke runs
    paper_args: dict[str, Any]     # the paper's configuration (defaults of the builder unless noted)


def register(arch_id: str, *, dims: tuple[int, ...], paper: str, summary: str,
             tiny_args: dict[str, Any] | None = None, paper_args: dict[str, Any] | None = None):
    """Class/function decorator that adds a network builder to the registry under ``arch_id``."""

    def decorate(builder):
        if arch_id in _ARCHITECTURES:
            raise ValueError(f"architecture id {arch_id!r} registered twice")
        _ARCHITECTURES[arch_id] = Architecture(arch_id, builder, dims, paper, summary,
                                               dict(tiny_args or {}), dict(paper_args or {}))
        return builder

    return decorate


def architectures() -> dict[str, Architecture]:
    """All registered architectures by id."""
    from ._load_all import load_all

    load_all()
    return dict(_ARCHITECTURES)


def get(arch_id: Any) -> Architecture:
    """The architecture ``arch_id``, importing only its module.

    Raises:
        KeyError: with the list of known ids when ``arch_id`` is unknown.
    """
    from ._load_all import load_module_of

    if arch_id not in _ARCHITECTURES and isinstance(arch_id, str):
        load_module_of(arch_id)
    if arch_id not in _ARCHITECTURES:
        known = architectures()   # every module: the table may not name the module that registers it
        if arch_id not in known:
            raise KeyError(f"unknown architecture {arch_id!r}; known: {', '.join(sorted(known))}")
    return _ARCHITECTURES[arch_id]


def build(config: dict[str, Any]):
    """Build a network from ``{"arch": id, "args": {...}}``.

    Raises:
        KeyError: with the list of known ids when ``arch`` is unknown.
    """
    return get(config.get("arch")).builder(**dict(config.get("args") or {}))
