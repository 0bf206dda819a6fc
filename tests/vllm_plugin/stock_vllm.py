"""What the vLLM plugin's tests share: vLLM without the plugin, in a process of its own."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys


def stock_vllm(folder, prompts, max_new_tokens: int) -> tuple[list[list[int]], list[int], list[list[float]]]:
    """``check.greedy`` (tokens, visual tokens per prompt, log-probabilities) from vLLM with the plugin off
    (TOKENPRUNE_VLLM=0, set before vLLM loads its plugins, so in a process of its own)."""
    code = ("import json, pickle, sys\n"
            "from tokenprune.vllm import check\n"
            "if __name__ == '__main__':\n"
            "    prompts = pickle.load(sys.stdin.buffer)\n"
            f"    llm = check.engine({str(folder)!r}, None)\n"
            "    assert not llm.apply_model(check.served_class)[0].startswith('Tokenprune')\n"
            f"    print('RESULT', json.dumps(check.greedy(llm, prompts, {max_new_tokens})))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TOKENPRUNE_VLLM": "0",
                                                             "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
                         input=pickle.dumps(prompts), capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    line = next(x for x in out.stdout.decode().splitlines() if x.startswith("RESULT "))
    return tuple(json.loads(line[len("RESULT "):]))
