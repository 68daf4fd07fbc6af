"""Bad files: missing, a directory, unreadable, a FIFO or device, binary or non-UTF-8, empty, oversized, base:
and include: outside the project root (also through a symlink), include cycles. One line naming the file;
exit 2; nothing created; a referenced file's text never appears in the line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bad_inputs.conftest import TINY_BASE, TINY_SPEC, Case  # pytest (importlib mode) registers it

SECRET = "TOPSECRET-91ab root-only first line\nsecond line\n"
SPACE = "model.dropout: {type: float, low: 0.0, high: 0.5}\n"
INCLUDE_SPEC = TINY_SPEC.replace("space:\n  model.dropout: {type: float, low: 0.0, high: 0.5}\n"
                                 "  model.bn: {type: categorical, choices: [none, before_act]}\n",
                                 "space: {include: INCLUDE}\n")
assert "INCLUDE" in INCLUDE_SPEC


def with_base(base: str) -> dict[str, str]:
    return {"tiny.yaml": TINY_SPEC.replace("base: base.yaml", f"base: {base}")}


def with_include(include: str, **files: str | bytes) -> dict[str, str | bytes]:
    return {"base.yaml": TINY_BASE, "tiny.yaml": INCLUDE_SPEC.replace("INCLUDE", include), **files}


def outside(name: str, text: str = SECRET):
    """Setup: a file beside the case directory, outside its project root (the case directory itself)."""
    def setup(d: Path) -> None:
        (d.parent / name).write_text(text)
    return setup


def mkdir(name: str):
    return lambda d: (d / name).mkdir()


def mkfifo(name: str):
    return lambda d: os.mkfifo(d / name)


def symlink(name: str, target: str, text: str = SECRET):
    def setup(d: Path) -> None:
        (d.parent / target).write_text(text)
        (d / name).symlink_to(d.parent / target)
    return setup


V = ["validate", "{d}/tiny.yaml"]
R = ["run", "{d}/tiny.yaml"]
BIG = "description: |\n" + ("  " + "z" * 98 + "\n") * 11_000  # > 1 MiB

CASES = [
    Case("files-spec-missing", ["validate", "{d}/nope.yaml"], expect=("nope.yaml", "no such file")),
    Case("files-spec-is-directory", ["validate", "{d}/specs"], setup=mkdir("specs"), expect=("specs", "directory")),
    Case("files-spec-fifo", ["validate", "{d}/pipe.yaml"], setup=mkfifo("pipe.yaml"),
         expect=("pipe.yaml", "not a regular file")),
    Case("files-spec-dev-zero", ["run", "/dev/zero"], expect=("/dev/zero", "not a regular file")),
    Case("files-spec-through-a-file", ["validate", "{d}/base.yaml/tiny.yaml"], files={"base.yaml": TINY_BASE},
         expect=("base.yaml/tiny.yaml", "cannot read")),
    Case("files-spec-binary", V, {"tiny.yaml": b"\x00\x01\x02\xff\xfe binary\n"},
         expect=("tiny.yaml", "not UTF-8")),
    Case("files-spec-latin1", V, {"tiny.yaml": TINY_SPEC.replace("tiny", "caf\xe9").encode("latin-1")},
         expect=("tiny.yaml", "not UTF-8")),
    Case("files-spec-empty", V, {"tiny.yaml": ""}, expect=("tiny.yaml", "empty file")),
    Case("files-spec-only-comments", R, {"tiny.yaml": "# nothing here\n"}, expect=("tiny.yaml", "empty file")),
    Case("files-spec-oversized", V, {"tiny.yaml": TINY_SPEC + BIG}, expect=("tiny.yaml", "1,048,576")),
    Case("files-base-missing", V, with_base("nope.yaml"), expect=("tiny.yaml", "base", "'nope.yaml'", "not found")),
    Case("files-base-is-directory", V, with_base("sub"), setup=mkdir("sub"), expect=("tiny.yaml", "base", "'sub'")),
    Case("files-base-outside-root", V, with_base("../secret.txt"), setup=outside("secret.txt"),
         expect=("tiny.yaml", "base", "'../secret.txt'", "outside the project root", "--allow-outside")),
    Case("files-base-etc-passwd", R, with_base("/etc/passwd"),
         expect=("tiny.yaml", "base", "'/etc/passwd'", "outside the project root")),
    Case("files-base-symlink-escape", V, with_base("base.yaml"), setup=symlink("base.yaml", "secret.txt"),
         expect=("tiny.yaml", "base", "'base.yaml'", "outside the project root", "secret.txt")),
    Case("files-base-allowed-not-a-config", V + ["--allow-outside", "{d}/.."], with_base("../secret.txt"),
         setup=outside("secret.txt"), expect=("secret.txt", "the document is a str", "not a TrainConfig mapping")),
    Case("files-base-allowed-malformed", V + ["--allow-outside", "{d}/.."], with_base("../secret.txt"),
         setup=outside("secret.txt", "TOPSECRET-91ab: [unclosed\n"), expect=("secret.txt", "malformed YAML")),
    Case("files-base-binary", V, {**with_base("base.yaml"), "base.yaml": b"\x89PNG\r\n\x1a\n\x00\x00"},
         expect=("base.yaml", "not UTF-8")),
    Case("files-base-oversized", V, {**with_base("base.yaml"), "base.yaml": TINY_BASE + BIG},
         expect=("base.yaml", "1,048,576")),
    Case("files-allow-outside-not-a-dir", V + ["--allow-outside", "{d}/nope"],
         {"base.yaml": TINY_BASE, "tiny.yaml": TINY_SPEC},
         expect=("--allow-outside", "nope", "not a directory")),
    Case("files-include-missing", V, with_include("spaces/nope.yaml"),
         expect=("tiny.yaml", "space.include", "'spaces/nope.yaml'", "not found")),
    Case("files-include-outside-root", V, with_include("../space.yaml"), setup=outside("space.yaml", SPACE),
         subprocess=True, expect=("tiny.yaml", "space.include", "'../space.yaml'", "outside the project root")),
    Case("files-include-secret-outside", R, with_include("../secret.txt"), setup=outside("secret.txt"),
         expect=("tiny.yaml", "space.include", "outside the project root")),
    Case("files-include-allowed-not-a-mapping", V + ["--allow-outside", "{d}/.."], with_include("../secret.txt"),
         setup=outside("secret.txt"), expect=("secret.txt", "the document is a str", "not a mapping")),
    Case("files-include-symlink-escape", V, with_include("space.yaml"), setup=symlink("space.yaml", "s.txt", SPACE),
         expect=("tiny.yaml", "space.include", "'space.yaml'", "outside the project root")),
    Case("files-include-cycle", V, with_include("a.yaml", **{"a.yaml": "include: b.yaml\n" + SPACE,
                                                            "b.yaml": "include: a.yaml\n"}),
         expect=("b.yaml", "space.include", "'a.yaml'", "include cycle")),
    Case("files-include-self", V, with_include("a.yaml", **{"a.yaml": "include: a.yaml\n"}),
         expect=("a.yaml", "include cycle")),
    Case("files-include-directory", V, with_include("spaces"), setup=mkdir("spaces"),
         expect=("tiny.yaml", "space.include", "'spaces'", "not found")),
    Case("files-include-binary", V, with_include("s.yaml", **{"s.yaml": b"\xff\xfe\x00m\x00o"}),
         expect=("s.yaml", "not UTF-8")),
    Case("files-include-empty", V, with_include("s.yaml", **{"s.yaml": ""}), expect=("s.yaml", "empty file")),
    Case("files-include-fifo", V, with_include("pipe.yaml"), setup=mkfifo("pipe.yaml"),
         expect=("tiny.yaml", "space.include", "'pipe.yaml'", "not found")),
    Case("files-include-duplicate-key", V, with_include("s.yaml", **{"s.yaml": SPACE + SPACE}),
         expect=("s.yaml", "line 2", "duplicate key")),
    Case("files-train-config-missing", ["train", "{d}/nope.yaml"], expect=("nope.yaml", "no such file")),
    Case("files-train-config-directory", ["train", "{d}/cfgs"], setup=mkdir("cfgs"), expect=("cfgs", "directory")),
    Case("files-train-config-binary", ["train", "{d}/cfg.yaml"], {"cfg.yaml": bytes(range(256))},
         expect=("cfg.yaml", "not UTF-8")),
    Case("files-train-config-oversized", ["train", "{d}/cfg.yaml"], {"cfg.yaml": TINY_BASE + BIG},
         expect=("cfg.yaml", "1,048,576")),
]
if os.geteuid() != 0:  # root reads a mode-000 file
    CASES.append(Case("files-spec-unreadable", V, {"tiny.yaml": TINY_SPEC}, setup=lambda d: (d / "tiny.yaml").chmod(0),
                      expect=("tiny.yaml", "cannot read")))

# cases whose referenced file holds a secret: its text never reaches the line
SECRET_CASES = {c.id for c in CASES if "secret" in c.id or "allowed" in c.id or "symlink" in c.id
                or "passwd" in c.id}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(bad_input, case):
    line = bad_input(case)
    if case.id in SECRET_CASES:
        assert "TOPSECRET" not in line and "root:x" not in line and "second" not in line, line
