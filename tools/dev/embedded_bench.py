#!/usr/bin/python3
"""Prefill and decode tokens/s as an embedding program sees them: through the library (the Python
package, which calls what libkiln.so calls), so without the `kiln` program's restart under
OMP_WAIT_POLICY=active. Run it under different OMP_WAIT_POLICY values (docs/performance.md,
"Embedding: OpenMP's wait policy"); `--contend N` runs N busy processes beside it.

    PYTHONPATH=build/python tools/dev/embedded_bench.py ARTIFACT [--prompt-tokens 512]
        [--gen-tokens 128] [--repeat 5] [--threads 2] [--contend 0] [--json]

Prints the median and range of each over --repeat runs. The first run's figures include nothing
of start-up: the engine is opened, then warmed by one prefill and a few decode steps.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "build", "python"))

import kiln  # noqa: E402


def prompt_of(n, vocab, seed):
    return [(seed * 7919 + i * 104729) % (vocab - 3) + 3 for i in range(n)]


def one_run(engine, vocab, prompt_tokens, gen_tokens, seed):
    prompt = prompt_of(prompt_tokens, vocab, seed)
    t0 = time.perf_counter()
    prefix = engine.prefill(prompt, max_tokens=gen_tokens + 1, stop=[])
    prefill_s = time.perf_counter() - t0
    engine.insert(prefix, 0)
    decoded, decode_s = 0, 0.0
    while decoded < gen_tokens:
        t0 = time.perf_counter()
        (step,) = engine.generate()
        decode_s += time.perf_counter() - t0
        decoded += 1
        if step["finish"] is not None:
            break
    engine.release(0)
    return prompt_tokens / prefill_s, decoded / decode_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--contend", type=int, default=0, help="busy processes running beside it")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    engine = kiln.Engine(a.artifact, threads=a.threads)
    vocab = kiln.inspect(a.artifact, verify=False)["config"]["vocab_size"]
    one_run(engine, vocab, min(a.prompt_tokens, 32), 4, 0)  # warm-up
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(a.contend)]
    try:
        runs = [one_run(engine, vocab, a.prompt_tokens, a.gen_tokens, r + 1)
                for r in range(a.repeat)]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    prefill = [r[0] for r in runs]
    decode = [r[1] for r in runs]
    out = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "contend": a.contend,
        "prefill_tokens_per_s": statistics.median(prefill),
        "prefill_range": [min(prefill), max(prefill)],
        "decode_tokens_per_s": statistics.median(decode),
        "decode_range": [min(decode), max(decode)],
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(f"OMP_WAIT_POLICY={out['omp_wait_policy']} contend={a.contend}: "
              f"prefill {out['prefill_tokens_per_s']:.1f} tokens/s "
              f"({min(prefill):.1f}-{max(prefill):.1f}), "
              f"decode {out['decode_tokens_per_s']:.2f} tokens/s "
              f"({min(decode):.2f}-{max(decode):.2f})")


if __name__ == "__main__":
    main()
