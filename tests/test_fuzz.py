"""Seeded, time-bounded fuzzing of the loaders (issue 11): 1,000 mutated GGUF files through the model loader
and the tokenizer loader, 500 mutated safetensors checkpoints (shard headers, index, config), 300 mutated
tokenizer files (SentencePiece protobufs, tokenizer.json documents). Zero outcomes
other than "loaded" or a Gemma4Error are allowed; the run happens in a subprocess under a 4 GiB
address-space limit (an unbounded allocation fails it) with a per-case alarm (a hang fails it). The corpus
generator is tests/fuzz_corpus.py."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

LIMIT = 4 << 30
HERE = Path(__file__).parent


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _run(tmp_path, *args, timeout=150):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    r = subprocess.run([sys.executable, str(HERE / "fuzz_corpus.py"), str(out), *args], preexec_fn=_limit,
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert out.exists(), r.stderr[-3000:]
    return r, json.loads(out.read_text())


def test_fuzz_loaders(tmp_path):
    r, res = _run(tmp_path, "--seed", "11", "--gguf", "1000", "--safetensors", "500", "--tokenizer-files", "300")
    print(f"\nfuzz: {res['cases']} cases in {res['seconds']} s: {json.dumps(res['outcomes'])}")
    assert not res["unexpected"], json.dumps(res["unexpected"][:5], indent=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["cases"] == {"gguf": 1000, "safetensors": 500, "tokenizer_files": 300}
    for key in ("gguf/load_gguf", "gguf/load_tokenizer", "safetensors/load_safetensors_dir",
                "tokenizer_files/load_tokenizer"):
        o = res["outcomes"][key]
        # both outcomes occur: the mutations are neither all harmless nor all rejected at the magic number
        assert o.get("refused", 0) > 0.3 * sum(o.values()) and o.get("loaded", 0) > 0, (key, o)


def test_address_space_limit_is_in_force(tmp_path):
    code = ("import resource, torch\n"
            "assert resource.getrlimit(resource.RLIMIT_AS)[0] == %d\n"
            "try:\n    torch.empty(5 << 30, dtype=torch.uint8)\nexcept (MemoryError, RuntimeError):\n    print('refused')\n"
            % LIMIT)
    r = subprocess.run([sys.executable, "-c", code], preexec_fn=_limit, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "refused", r.stderr[-2000:]
