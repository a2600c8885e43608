"""llama.cpp beside dsmoe: build it from source, convert our exports, run its benchmarks.

llama.cpp is the engine most people use to run models on a CPU, and it runs the
DeepSeek-V3 architecture (`deepseek2` in its terms), so `bench/decode.py` compares our
engine with it on the same weights and thread count. This module is the glue:

    python -m bench.llamacpp build            # download, unpack, cmake (about 8 min on 2 cores)
    python -m bench.llamacpp convert HF_DIR OUT.gguf
    python -m bench.llamacpp status           # where the build is, or what is missing

- build: `pip download --no-binary :all: --no-deps llama-cpp-python` fetches the PyPI sdist,
  whose `vendor/llama.cpp` is a full llama.cpp source tree (with its converter and the
  `gguf` Python package); cmake builds only the tools we run (llama-bench,
  llama-batched-bench, llama-simple, llama-tokenize), CPU only, Release, static.
  Everything lives in one cache folder outside the repository: `$DSMOE_LLAMACPP_DIR`, else
  `~/.cache/dsmoe/llama.cpp`. Nothing is downloaded at test or benchmark time: without a
  build the benchmark row says so.
- convert: the vendored `convert_hf_to_gguf.py` on one of our Hugging Face exports, f32,
  run by this Python with `gguf-py` on the path. Its converter identifies a BPE
  pre-tokenizer by hashing the tokens of a test string, and ours (trained here) is not in
  its table. Ours is `Sequence[Digits(individual_digits), ByteLevel(use_regex)]`: split
  off every digit, then the GPT-2 regex. llama.cpp's `starcoder` pre-tokenizer is exactly
  that pair of regexes (`\\p{N}`, then the GPT-2 pattern; `refact`, `smollm` and others
  share it), so the converter is told `starcoder` after our tokenizer's pre-tokenizer is
  checked to be that one; any other pre-tokenizer is an error, not a guess.
  `check_tokenization` then compares llama.cpp's token ids with ours on a test text.
- bench: `llama-bench` gives prefill (pp) and batch-1 decode (tg, after `-d` cached
  tokens, as ours decodes after its prompt) tokens/s; `llama-batched-bench` gives batched
  decode (S_TG: generated tokens/s over all sequences). One repetition per call (the
  caller interleaves rounds and takes medians); model loading is not timed. The weights
  are f32; llama.cpp keeps its KV cache in f16 (its default; llama-bench has no f32
  cache type), which at these context lengths is about 1% of the bytes a step reads.
Not here: quantised formats (we compare f32 with f32), llama.cpp's server.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from dsmoe.errors import DsmoeError

PACKAGE = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-simple", "llama-tokenize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
    "-DGGML_OPENMP=ON", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
)
# llama.cpp's name for our pre-tokenizer (see the module note) and what it must look like.
PRE_TOKENIZER = "starcoder"
OUR_PRE_TOKENIZER = [{"type": "Digits", "individual_digits": True},
                     {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}]
CHECK_TEXT = ("The year 2024 had 365 days; x=3.14, y=-42!  Tabs\tand\nnew lines, "
              "café, naïve, 日本語, emoji 🦙 and   spaces. I'll say it's 100% done.")
HOW_TO_BUILD = "python -m bench.llamacpp build (downloads the llama-cpp-python sdist; cmake, ~8 min on 2 cores)"


def home() -> Path:
    """The cache folder holding the sdist, its sources and the build."""
    return Path(os.environ.get("DSMOE_LLAMACPP_DIR", "~/.cache/dsmoe/llama.cpp")).expanduser()


def source_dir(root: Path | None = None) -> Path | None:
    """The unpacked `vendor/llama.cpp` tree, or None before `build`."""
    found = sorted((root or home()).glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    return found[-1] if found else None


def tool(name: str, root: Path | None = None) -> Path | None:
    """A built llama.cpp program, or None."""
    path = (root or home()) / "build" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def available(root: Path | None = None) -> bool:
    """Whether the programs the benchmark runs and the converter are all present."""
    return (all(tool(t, root) for t in ("llama-bench", "llama-batched-bench"))
            and source_dir(root) is not None)


# ----------------------------------------------------------------------------- build
def _run(cmd: list, log: Path | None = None, **kw) -> None:
    print("+ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    if log is None:
        subprocess.run(cmd, check=True, **kw)
        return
    with open(log, "a") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    if result.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise DsmoeError(f"{cmd[0]} failed (exit {result.returncode}); the end of {log}:\n{tail}")


def build(root: Path | None = None, jobs: int | None = None) -> dict[str, float]:
    """Download the sdist (once), unpack it (once) and build the tools (incrementally).
    Returns the seconds each stage took."""
    root = root or home()
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("cmake") is None:
        raise DsmoeError("cmake is not installed: install cmake and a C++ compiler, then rerun the build")
    times = {}
    sdists = sorted((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        start = time.perf_counter()
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              PACKAGE, "-d", str(root / "sdist")])
        times["download"] = time.perf_counter() - start
        sdists = sorted((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise DsmoeError(f"pip download left no llama_cpp_python-*.tar.gz in {root / 'sdist'}")
    src = source_dir(root)
    if src is None:
        start = time.perf_counter()
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(root / "src", filter="data")
        times["unpack"] = time.perf_counter() - start
        src = source_dir(root)
        if src is None:
            raise DsmoeError(f"{sdists[-1].name} has no vendor/llama.cpp: this llama-cpp-python release "
                             "does not vendor llama.cpp; pin an older one")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log = root / "build.log"
    start = time.perf_counter()
    _run(["cmake", "-S", str(src), "-B", str(root / "build"), *generator, *CMAKE_OPTIONS], log)
    _run(["cmake", "--build", str(root / "build"), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 1)], log)
    times["cmake"] = time.perf_counter() - start
    missing = [t for t in TOOLS if tool(t, root) is None]
    if missing:
        raise DsmoeError(f"the build finished without {missing}; see {log}")
    return times


# --------------------------------------------------------------------------- convert
def check_pre_tokenizer(tokenizer_json: dict) -> None:
    """Raise unless the tokenizer's pre-tokenizer is the one llama.cpp calls `starcoder`."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    ok = len(steps) == len(OUR_PRE_TOKENIZER) and all(
        all(step.get(k) == v for k, v in want.items()) for step, want in zip(steps, OUR_PRE_TOKENIZER))
    if not ok:
        raise DsmoeError(f"the tokenizer's pre-tokenizer {json.dumps(pre)} is not "
                         f"Digits(individual) + ByteLevel(regex), which llama.cpp knows as "
                         f"'{PRE_TOKENIZER}'; for another tokenizer add its name to convert_hf_to_gguf.py's "
                         "table (convert_hf_to_gguf_update.py) instead")


# Runs inside the converter's process: answer its pre-tokenizer question for our tokenizer
# (checked by the caller), leave every other tokenizer to its own table.
_CONVERT = """
import runpy, sys
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return {pre!r}
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def convert(hf_dir: str | Path, out_file: str | Path, root: Path | None = None, outtype: str = "f32") -> Path:
    """Our HF export (with its tokenizer files) as a GGUF file, by llama.cpp's own converter."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    src = source_dir(root)
    if src is None:
        raise DsmoeError(f"no llama.cpp sources under {root or home()}: run {HOW_TO_BUILD}")
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DsmoeError(f"{hf_dir} has no tokenizer.json, which llama.cpp's converter needs: "
                         "export with save_hf(model, dir, tokenizer=...)")
    check_pre_tokenizer(json.loads(tokenizer_file.read_text(encoding="utf-8")))
    code = _CONVERT.format(pre=PRE_TOKENIZER, script=str(src / "convert_hf_to_gguf.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")]
                                                        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", code, str(hf_dir), "--outtype", outtype, "--outfile", str(out_file)],
                            env=env, capture_output=True, text=True)
    if result.returncode or not out_file.is_file():
        raise DsmoeError(f"llama.cpp's converter failed on {hf_dir} (exit {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    return out_file


def llama_tokens(gguf: Path, text: str, root: Path | None = None) -> list[int]:
    """llama.cpp's token ids for `text` (no BOS), by llama-tokenize."""
    exe = tool("llama-tokenize", root)
    if exe is None:
        raise DsmoeError(f"llama-tokenize is not built: run {HOW_TO_BUILD}")
    result = subprocess.run([str(exe), "-m", str(gguf), "-p", text, "--ids", "--no-bos", "--log-disable"],
                            capture_output=True, text=True)
    if result.returncode:
        raise DsmoeError(f"llama-tokenize failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_tokenization(gguf: Path, tokenizer, text: str = CHECK_TEXT, root: Path | None = None) -> None:
    """Raise unless llama.cpp splits `text` into the same ids as our tokenizer."""
    theirs, ours = llama_tokens(gguf, text, root), tokenizer.encode(text)
    if theirs != ours:
        raise DsmoeError(f"llama.cpp tokenizes differently from ours: {theirs} != {ours}")


# ----------------------------------------------------------------------------- bench
def _json_records(text: str) -> list[dict]:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _tool_output(name: str, args: list[str], root: Path | None, attempts: int = 3) -> list[dict]:
    """A tool's JSON records. llama.cpp prints them through an asynchronous log thread,
    and on a busy machine the process now and then exits (status 0) before that thread
    has written them: such a run is repeated."""
    exe = tool(name, root)
    if exe is None:
        raise DsmoeError(f"{name} is not built: run {HOW_TO_BUILD}")
    for _ in range(attempts):
        result = subprocess.run([str(exe), *args], capture_output=True, text=True)
        records = _json_records(result.stdout) if result.returncode == 0 else []
        if records or result.returncode:
            break
    if not records:
        raise DsmoeError(f"{name} {' '.join(args)} gave no results (exit {result.returncode}): "
                         f"{result.stderr[-2000:]}")
    return records


def bench_decode(gguf: Path, threads: int, depth: int, new_tokens: int, root: Path | None = None) -> float:
    """llama-bench: batch-1 decode tokens/s of `new_tokens` tokens after `depth` cached ones."""
    recs = _tool_output("llama-bench", ["-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(new_tokens),
                                        "-d", str(depth), "-r", "1", "-o", "json"], root)
    return float(recs[-1]["avg_ts"])


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def decode_cpu_per_token(gguf: Path, threads: int, depth: int, new_tokens: int, root: Path | None = None) -> float:
    """CPU seconds (user + system, all threads) llama-bench spends per decoded token after
    `depth` cached ones: a run decoding 32 + `new_tokens` tokens less one decoding 32, over
    `new_tokens` (loading the model and the depth prefill cancel out). On a shared machine
    this is steadier than tokens/s, which also counts time spent waiting for a core."""
    spent = []
    for n in (32 + new_tokens, 32):
        start = children_cpu_seconds()
        bench_decode(gguf, threads, depth, n, root)
        spent.append(children_cpu_seconds() - start)
    return (spent[0] - spent[1]) / new_tokens


def bench_prefill(gguf: Path, threads: int, prompt: int, root: Path | None = None) -> float:
    """llama-bench: prefill tokens/s of one `prompt`-token prompt."""
    recs = _tool_output("llama-bench", ["-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", "0",
                                        "-r", "1", "-o", "json"], root)
    return float(recs[-1]["avg_ts"])


def batched_bench(gguf: Path, threads: int, batch: int, prompt: int, new_tokens: int,
                  root: Path | None = None) -> float:
    """llama-batched-bench: decode tokens/s summed over `batch` sequences (S_TG), each with
    its own `prompt`-token prompt and `new_tokens` new tokens."""
    ctx = batch * (prompt + new_tokens) + 16
    recs = _tool_output("llama-batched-bench", [
        "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(prompt), "-ntg", str(new_tokens), "-npl", str(batch), "--output-format", "jsonl"], root)
    return float(recs[-1]["speed_tg"])


# ------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="download the llama-cpp-python sdist and build llama.cpp's tools")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    c = sub.add_parser("convert", help="convert a dsmoe HF export to GGUF with llama.cpp's converter")
    c.add_argument("hf_dir")
    c.add_argument("out_file")
    c.add_argument("--outtype", default="f32")
    sub.add_parser("status", help="where the build is, or what is missing")
    opts = parser.parse_args(argv)
    try:
        if opts.verb == "build":
            start = time.perf_counter()
            times = build(jobs=opts.jobs)
            stages = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            print(f"built {', '.join(TOOLS)} in {home() / 'build' / 'bin'} ({stages}; total "
                  f"{time.perf_counter() - start:.0f} s)")
        elif opts.verb == "convert":
            start = time.perf_counter()
            out = convert(opts.hf_dir, opts.out_file, outtype=opts.outtype)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
        else:
            src = source_dir()
            print(f"folder: {home()}\nsources: {src or 'absent'}")
            for t in TOOLS:
                print(f"{t}: {tool(t) or 'absent'}")
            if not available():
                print(f"to build: {HOW_TO_BUILD}")
    except DsmoeError as err:
        print(f"python -m bench.llamacpp: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
