"""Real weights: where the user's checkpoints are, found without downloading anything.

:class:`WeightPaths` holds the files of a real InfiniteTalk set-up (the arguments of
``InfiniteTalkPipeline.from_files``); :func:`find_weights` finds them from the
``WANSTUDIO_WEIGHTS`` environment variable or a ``wanstudio.toml`` / ``.json`` file
(README.md, section "Real weights").
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError

TINY_PRESET = "tiny-infinitetalk"  # what the studio runs when no weights are configured
WEIGHTS_ENV = "WANSTUDIO_WEIGHTS"  # a folder of checkpoints, or a wanstudio.toml / .json file
CONFIG_NAMES = ("wanstudio.toml", "wanstudio.json")
README_SECTION = "README.md, section 'Real weights'"


def config_search_path() -> list[Path]:
    """Where :func:`find_weights` looks for a config file when the variable is not set."""
    home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "wanstudio"
    return [Path.cwd() / n for n in CONFIG_NAMES] + [home / n for n in CONFIG_NAMES]


@dataclass(frozen=True)
class WeightPaths:
    """The files of a real InfiniteTalk set-up (``InfiniteTalkPipeline.from_files`` arguments).

    Args:
        dit: Wan2.1-I2V-14B DiT: the shards' ``*.safetensors.index.json``, their folder, or one
            file (several entries are merged in order): safetensors bf16 / fp16 / fp8 / scaled
            fp8, GGUF, or a quanto file (its ``.json`` map beside it).
        vae: ``Wan2.1_VAE.pth`` (or a bf16 safetensors). text_encoder: umT5-XXL
            (``models_t5_umt5-xxl-enc-bf16.pth`` or an HF folder); tokenizer: its tokenizer folder.
        clip: CLIP ViT-H/14 (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``).
        wav2vec: the ``chinese-wav2vec2-base`` folder.
        infinitetalk: ``single/infinitetalk.safetensors``, or an fp8 / GGUF file of it (None
            when ``dit`` already holds it).
        source: where these paths came from (shown to the user).
    """

    dit: tuple[str, ...]
    vae: str
    text_encoder: str
    clip: str
    wav2vec: str
    infinitetalk: str | None = None
    tokenizer: str | None = None
    source: str = ""

    REQUIRED = ("dit", "vae", "text_encoder", "clip", "wav2vec")
    OPTIONAL = ("infinitetalk", "tokenizer")

    def __post_init__(self) -> None:
        dit = (self.dit,) if isinstance(self.dit, (str, os.PathLike)) else tuple(self.dit)
        object.__setattr__(self, "dit", tuple(str(p) for p in dit))
        for name in ("vae", "text_encoder", "clip", "wav2vec", "infinitetalk", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        empty = [n for n in self.REQUIRED if not getattr(self, n)]
        if empty:
            raise ConfigError(f"weights{_from(self.source)}: no path for {', '.join(empty)}")

    @classmethod
    def from_mapping(
        cls, data: Mapping, base: str | os.PathLike | None = None, source: str = ""
    ) -> WeightPaths:
        """From a config's ``[weights]`` table; relative paths are relative to ``base``."""
        data = dict(data.get("weights", data))
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"weights{_from(source)}: unknown entries {unknown}; known: {', '.join(sorted(known))}"
            )

        def resolve(p):
            p = Path(os.path.expandvars(os.path.expanduser(str(p))))
            return str(p if p.is_absolute() or base is None else Path(base) / p)

        kw = {}
        for k, v in data.items():
            if v in (None, ""):
                continue
            kw[k] = tuple(resolve(x) for x in v) if k == "dit" and not isinstance(v, str) else resolve(v)
        missing = [n for n in cls.REQUIRED if n not in kw]
        if missing:
            raise ConfigError(f"weights{_from(source)}: no path for {', '.join(missing)}")
        return cls(**kw, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WeightPaths:
        """A ``.toml`` or ``.json`` file with a ``weights`` table (README.md, "Real weights")."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"{path}: reading TOML needs Python >= 3.11; use a .json file") from None
            data = tomllib.loads(text)
        return cls.from_mapping(data, base=path.parent, source=str(path))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> WeightPaths:
        """Find the files in a download folder (the layouts of the official repositories)."""
        folder = Path(folder)
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return cls.from_file(folder / name)
        found, missing = {}, []
        for part, patterns in _WEIGHT_PATTERNS.items():
            hit = _search(folder, patterns)
            if hit is not None:
                found[part] = str(hit)
            elif part in cls.REQUIRED:
                missing.append(f"{part} ({patterns[0]})")
        if missing:
            raise ConfigError(
                f"{folder}: cannot find {', '.join(missing)}. Put a wanstudio.toml in the folder "
                f"naming each file ({README_SECTION} shows one)"
            )
        if Path(found["dit"]).parent.name == "quant_models":
            found.pop("infinitetalk", None)  # the quanto file already holds the audio layers
        found["dit"] = (found["dit"],)
        return cls(**found, source=str(folder))

    def missing(self) -> list[str]:
        """'<part>: <path>' for every named path that does not exist."""
        out = [f"dit: {p}" for p in self.dit if not Path(p).exists()]
        for name in ("vae", "text_encoder", "clip", "wav2vec", "infinitetalk", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                out.append(f"{name}: {value}")
        return out

    def as_kwargs(self) -> dict:
        """Keyword arguments of ``InfiniteTalkPipeline.from_files``."""
        return dict(
            dit=list(self.dit),
            infinitetalk=self.infinitetalk,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            clip=self.clip,
            wav2vec=self.wav2vec,
        )


def _from(source: str) -> str:
    return f" from {source}" if source else ""


# file patterns per component, most specific first (official repo layouts, then ComfyUI names:
# safetensors bf16 / fp16 / fp8 / scaled fp8, then city96-style GGUF, then the official quanto
# file, which holds the whole InfiniteTalk DiT; the loader reads its JSON map beside it itself)
_WEIGHT_PATTERNS: dict[str, tuple[str, ...]] = {
    "dit": (
        "diffusion_pytorch_model.safetensors.index.json",
        "*wan2.1*i2v*14b*.safetensors",
        "*wan2_1*i2v*14b*.safetensors",
        "*wan2.1*i2v*14b*.gguf",
        "*wan2_1*i2v*14b*.gguf",
        "quant_models/infinitetalk_single_*.safetensors",
    ),
    "infinitetalk": (
        "single/infinitetalk.safetensors",
        "infinitetalk.safetensors",
        "*infinitetalk*.safetensors",
        "*infinitetalk*.gguf",
    ),
    "vae": ("Wan2.1_VAE.pth", "*wan*2.1*vae*.safetensors", "*wan*vae*.safetensors"),
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.pth", "*umt5*xxl*.safetensors", "*umt5*xxl*.pth"),
    "tokenizer": ("google/umt5-xxl/",),
    "clip": (
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "*clip*vit*huge*.pth",
        "*clip*vision*h*.safetensors",
    ),
    "wav2vec": ("chinese-wav2vec2-base/",),
}


def _search(folder: Path, patterns: Iterable[str], depth: int = 4) -> Path | None:
    """First match of any pattern under ``folder`` (patterns ending in '/' match folders)."""
    for pattern in patterns:
        want_dir = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        for level in range(depth + 1):
            glob = "/".join(["*"] * level + [pattern])
            hits = sorted(p for p in folder.glob(glob) if p.is_dir() == want_dir)
            if not hits and not want_dir:  # case-insensitive retry (ComfyUI names vary in case)
                low = pattern.lower()
                hits = sorted(
                    p
                    for p in folder.glob("/".join(["*"] * level + ["*"]))
                    if p.is_file() and _fnmatch(p, low)
                )
            if hits:
                return hits[0]
    return None


def _fnmatch(path: Path, pattern_lower: str) -> bool:
    tail = "/".join(path.parts[-(pattern_lower.count("/") + 1) :]).lower()
    return fnmatch.fnmatch(tail, pattern_lower)


def find_weights(
    environ: Mapping[str, str] | None = None,
    search: Iterable[str | os.PathLike] | None = None,
    *,
    required: bool = False,
) -> WeightPaths | None:
    """The real weights the user pointed at, or None (then the notebooks use the tiny preset).

    Looks at ``$WANSTUDIO_WEIGHTS`` (a folder of checkpoints or a config file), then at
    ``wanstudio.toml`` / ``wanstudio.json`` in the working folder and in
    ``~/.config/wanstudio/`` (``search`` replaces that list). A path that is named but wrong
    raises ConfigError (never a silent fall back to random weights).

    Args:
        environ: the environment to read (default ``os.environ``).
        search: config files to try when the variable is not set (default
            :func:`config_search_path`).
        required: when nothing is configured, raise a ConfigError that says where it looked
            and how to point wanstudio at the weights, instead of returning None (for code
            that needs real weights: ``find_weights(required=True).as_kwargs()``).
    """
    environ = os.environ if environ is None else environ
    named = environ.get(WEIGHTS_ENV, "").strip()
    if named:
        path = Path(os.path.expanduser(named))
        if path.is_dir():
            return WeightPaths.from_folder(path)
        if path.is_file():
            return WeightPaths.from_file(path)
        raise ConfigError(f"${WEIGHTS_ENV} is {named!r}, which is neither a folder nor a file")
    searched = [Path(c) for c in (config_search_path() if search is None else search)]
    for candidate in searched:
        if candidate.is_file():
            return WeightPaths.from_file(candidate)
    if required:
        raise ConfigError(
            f"no real weights configured: ${WEIGHTS_ENV} is not set and none of these config files "
            f"exists: {', '.join(map(str, searched)) or '(none searched)'}. Set {WEIGHTS_ENV} to your "
            f"download folder or to a wanstudio.toml / .json file (export {WEIGHTS_ENV}=$HOME/weights), "
            f"or write a wanstudio.toml with a [weights] table in one of those places ({README_SECTION})."
        )
    return None


def describe_weights(weights: WeightPaths | None) -> str:
    """One paragraph for the notebook: what will be loaded and from where."""
    if weights is None:
        from ..pipeline.tiny_weights import tiny_weights_note

        return (
            f"No real weights configured: using the {TINY_PRESET!r} preset ({tiny_weights_note()}). "
            f"Set ${WEIGHTS_ENV} or write a wanstudio.toml to use real ones."
        )
    lines = [f"Real weights from {weights.source or 'the given paths'}:"]
    for name in ("dit", "infinitetalk", "vae", "text_encoder", "tokenizer", "clip", "wav2vec"):
        value = getattr(weights, name)
        if value:
            lines.append(f"  {name}: {', '.join(value) if isinstance(value, tuple) else value}")
    missing = weights.missing()
    if missing:
        lines.append("  MISSING: " + "; ".join(missing))
    return "\n".join(lines)
