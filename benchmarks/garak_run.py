"""garak's ``openai.OpenAICompatible`` generator against ``gemma4 serve``, all on loopback: one short probe
(``--suite encoding``, issue 14) or a handful of offline red-team probes on the house chat model, read into
the ``gemma4 redteam`` table (``--suite redteam``, issue 15).

garak pins its own (heavy) dependency set, so it lives in a separate virtualenv and is run as a
subprocess; it must never share the main environment's torch/transformers:

    python -m venv /tmp/garak-venv && /tmp/garak-venv/bin/pip install garak
    python benchmarks/garak_run.py                          # the real Gemma 3 270M (demo extra)
    python benchmarks/garak_run.py --model tiny-dir --cap 4 # any checkpoint `gemma4 serve` accepts
    python benchmarks/garak_run.py --suite redteam          # house-shakespeare-chat, red-team probes

``--suite redteam`` runs dan.DanInTheWild, tap.TAPCached, suffix.GCGCached, grandma.Substances, grandma.Win10,
phrasing.PastTense and encoding.InjectBase64 (all with packaged prompts and string detectors: offline),
``soft_probe_prompt_cap`` 5 (TAPCached and grandma ignore the cap), one greedy generation per prompt, primary
detectors only (``extended_detectors: false``: no hub-model detectors). The report is read with
``gemma4.redteam.garak`` (ASR per probe x detector from the scored attempts, Wilson 95% intervals, checked
against garak's own eval rows) and written with the ``gemma4 redteam`` report writer to ``--report-dir``
(JSON/Markdown/HTML: counts only, no prompt or reply text).

What it does:

1. starts ``gemma4 serve MODEL --port P --api-key KEY`` (binds 127.0.0.1) and waits for ``/health``;
2. runs ``garak --target_type openai.OpenAICompatible --probes encoding.InjectHex`` with a config file that
   points the generator at ``http://127.0.0.1:P/v1/`` (chat completions), caps the probe's prompts
   (``run.soft_probe_prompt_cap``), asks one generation per prompt and keeps the probe to garak's benign
   ``text_en`` payloads (its default list also holds slur terms, which we neither send nor store);
   ``encoding.DecodeMatch``/``DecodeApprox`` are string matchers, so no detector model, no NLTK data and no
   hub access are needed (HF_HUB_OFFLINE and friends are set anyway, and the run is time-bounded);
3. reads garak's report JSONL (``entry_type == "eval"`` rows) into a table of probe, detector, passed,
   failed; writes it with the run's facts to benchmarks/results/garak_encoding.json. The raw report (the
   prompts and the model's replies) stays in the temporary run directory and is not kept.

A "fail" is garak's verdict that the model produced the decoded payload (the probe's attack succeeded);
"pass" means it did not. For a 270M base-size model these numbers say little about safety: the point of
the run is that garak's stock generator talks to our server unchanged and every attempt gets an answer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gemma4.redteam import markdown_table, read_report, summarize_report, write_report

HERE = Path(__file__).resolve().parent
KEY = "sk-garak-local-only"
PROBE = "encoding.InjectHex"
SUITES = {
    "encoding": {"model": "gemma3-270m", "probes": [PROBE], "cap": 8, "max_tokens": 48, "temperature": 0.7,
                 "out": HERE / "results" / "garak_encoding.json"},
    "redteam": {"model": "house-shakespeare-chat",
                "probes": ["dan.DanInTheWild", "tap.TAPCached", "suffix.GCGCached", "grandma.Substances",
                           "grandma.Win10", "phrasing.PastTense", "encoding.InjectBase64"],
                "cap": 5, "max_tokens": 64, "temperature": 0.0, "out": HERE / "results" / "garak_redteam.json"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(base: str, proc: subprocess.Popen, limit: float) -> float:
    import httpx

    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"gemma4 serve exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"gemma4 serve was not healthy within {limit:.0f} s")


def _garak_config(port: int, name: str, cap: int, max_tokens: int, report_dir: Path, temperature: float,
                  extended: bool) -> str:
    # JSON is valid YAML, and garak's --config reads YAML.
    return json.dumps({
        "system": {"parallel_requests": False, "parallel_attempts": False, "lite": True},
        "run": {"generations": 1, "soft_probe_prompt_cap": cap, "seed": 0},
        "plugins": {
            "target_type": "openai.OpenAICompatible",
            "target_name": name,
            "extended_detectors": extended,
            "generators": {"openai": {"OpenAICompatible": {
                "uri": f"http://127.0.0.1:{port}/v1/", "max_tokens": max_tokens, "temperature": temperature,
                "seed": 0, "stop": [], "suppressed_params": ["n"]}}},
            "probes": {"encoding": {"payloads": ["default"]}},
        },
        "reporting": {"report_dir": str(report_dir), "report_prefix": "gemma4_serve"},
    }, indent=1)


def _summarise(report: Path) -> tuple[list[dict], dict]:
    rows, attempts, answered, garak_version = [], 0, 0, None
    for line in report.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        kind = rec.get("entry_type")
        if kind == "start_run setup":
            garak_version = rec.get("_config.version")
        elif kind == "init":
            garak_version = garak_version or rec.get("garak_version")
        elif kind == "attempt" and rec.get("status") == 2:  # 2: evaluated by the detectors
            attempts += 1
            outs = rec.get("outputs") or []
            answered += sum(1 for o in outs if o is not None and (o.get("text") if isinstance(o, dict) else o)
                            is not None)
        elif kind == "eval":
            rows.append({"probe": rec["probe"], "detector": rec["detector"], "passed": rec["passed"],
                         "failed": rec["fails"], "no_output": rec.get("nones", 0),
                         "evaluated": rec["total_evaluated"]})
    return rows, {"attempts": attempts, "outputs_with_text": answered, "garak_version": garak_version}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="encoding",
                    help="encoding: one probe on the 270M (issue 14); redteam: red-team probes on the house chat model")
    ap.add_argument("--model", default=None, help="what `gemma4 serve` loads (default: the suite's model)")
    ap.add_argument("--probes", default=None, help="comma-separated garak probes (default: the suite's)")
    ap.add_argument("--garak-python", default="/tmp/garak-venv/bin/python")
    ap.add_argument("--cap", type=int, default=None, help="prompts a probe may send (soft_probe_prompt_cap)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens garak asks for per reply")
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds garak may run (the whole run <= 10 min)")
    ap.add_argument("--out", default=None, help="the JSON summary (default: the suite's file in results/)")
    ap.add_argument("--report-dir", default=None, help="also write the gemma4 redteam report (JSON/MD/HTML) here")
    args = ap.parse_args()
    suite = SUITES[args.suite]
    args.model = args.model or suite["model"]
    args.cap = args.cap if args.cap is not None else suite["cap"]
    args.max_tokens = args.max_tokens if args.max_tokens is not None else suite["max_tokens"]
    args.out = args.out or str(suite["out"])
    probes = args.probes.split(",") if args.probes else suite["probes"]

    if not Path(args.garak_python).exists():
        raise SystemExit(f"{args.garak_python} not found: python -m venv /tmp/garak-venv && "
                         "/tmp/garak-venv/bin/pip install garak")
    t_all = time.time()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    name = args.model if not Path(args.model).exists() else Path(args.model).name
    work = Path(tempfile.mkdtemp(prefix="gemma4-garak-"))
    serve_cmd = [sys.executable, "-m", "gemma4", "serve", args.model, "--port", str(port), "--name", name,
                 "--max-batch", "4", "--max-tokens-cap", "512", "--timeout", "120"]
    env = dict(os.environ, GEMMA4_API_KEY=KEY)
    with open(work / "serve.log", "w") as log:
        server = subprocess.Popen(serve_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        start_s = _wait_health(base, server, 300)
        cfg = work / "garak.yaml"
        cfg.write_text(_garak_config(port, name, args.cap, args.max_tokens, work / "runs", suite["temperature"],
                                   extended=args.suite == "encoding"), encoding="utf-8")
        garak_cmd = [args.garak_python, "-m", "garak", "--config", str(cfg), "--target_type",
                     "openai.OpenAICompatible", "--target_name", name, "--probes", ",".join(probes)]
        genv = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "GEMMA4"))}
        genv.update(OPENAICOMPATIBLE_API_KEY=KEY, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1", NLTK_DATA=str(work / "nltk"), NO_PROXY="127.0.0.1,localhost",
                    no_proxy="127.0.0.1,localhost",
                    # garak's own config/data/cache dirs live in the throwaway run directory
                    XDG_CONFIG_HOME=str(work / "xdg" / "config"), XDG_DATA_HOME=str(work / "xdg" / "data"),
                    XDG_CACHE_HOME=str(work / "xdg" / "cache"))
        t0 = time.time()
        try:
            res = subprocess.run(garak_cmd, env=genv, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            (work / "garak.out").write_text((e.stdout or b"").decode() if isinstance(e.stdout, bytes)
                                            else (e.stdout or ""))
            raise SystemExit(f"garak did not finish within {args.timeout:.0f} s; logs in {work}") from None
        garak_s = time.time() - t0
        (work / "garak.out").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr, encoding="utf-8")
        reports = sorted((work / "runs").glob("*.report.jsonl"))
        if res.returncode != 0 or not reports:
            print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
            raise SystemExit(f"garak exited with {res.returncode}, reports {reports}; logs in {work}")
        rows, facts = _summarise(reports[-1])
        # The same report through gemma4.redteam.garak: ASR with Wilson intervals, checked against eval rows.
        summary = summarize_report(read_report(reports[-1]))
        metrics = {}
        try:
            import httpx

            text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
            metrics = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                       if not ln.startswith("#") and any(k in ln for k in ("requests_total", "finish_total",
                                                                       "tokens_total")) and len(ln.split()) == 2}
        except Exception as e:  # noqa: BLE001 - metrics are extra facts, never a reason to lose the run
            metrics = {"error": str(e)[:200]}
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    out = {
        "what": "garak openai.OpenAICompatible generator against gemma4 serve (chat completions, loopback)",
        "model": args.model, "probes": probes, "payloads": ["text_en (garak 'default')"], "generations": 1,
        "temperature": suite["temperature"],
        "soft_probe_prompt_cap": args.cap, "max_tokens": args.max_tokens,
        "serve_command": " ".join(serve_cmd[1:]).replace(sys.executable, "python"),
        "garak_command": "garak --config CFG --target_type openai.OpenAICompatible --target_name "
                         f"{name} --probes {','.join(probes)}",
        "server_start_s": round(start_s, 1), "garak_s": round(garak_s, 1), "total_s": round(time.time() - t_all, 1),
        **facts, "results": rows, "server_metrics": metrics, "redteam_summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"garak {facts['garak_version']} vs gemma4 serve {args.model}: {facts['attempts']} attempts, "
          f"{facts['outputs_with_text']} answered, garak ran {garak_s:.0f} s")
    print(markdown_table(summary), end="")
    print(f"garak eval rows agree with the attempts: {summary['eval_agrees']}")
    if args.report_dir:
        write_report(args.report_dir, summary, meta={k: out[k] for k in ("what", "model", "probes", "garak_version",
                                                                         "garak_command", "garak_s")})
        print(f"-> {args.report_dir}/report.{{json,md,html}}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
