"""vLLM on an exported folder, for tests/test_vllm.py, run by the Python of vLLM's own environment (README's test
command makes it with tests/install_vllm.sh: vLLM pins a torch other than the project's). Usage:
``python vllm_chat.py REQUEST.json RESULT.json``. The request names the folder, more of ``vllm.LLM``'s options, the
greedy token count and the conversations (an image file, then a text); for each, vLLM's ``LLM.chat`` - its chat
template, processor and model, as its OpenAI server runs them - gives the prompt's token ids and the generated ones,
written to the result file."""

import json
import os
import sys


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    from PIL import Image
    from vllm import LLM, SamplingParams

    options = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0) | request["options"]
    llm = LLM(model=request["model"], **options)
    greedy = SamplingParams(temperature=0, max_tokens=request["max_tokens"])
    results = []
    for conversation in request["conversations"]:
        image = Image.open(conversation["image"]).convert("RGB")
        parts = [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": conversation["text"]}]
        (out,) = llm.chat([{"role": "user", "content": parts}], greedy, use_tqdm=False)
        results.append({"prompt": list(out.prompt_token_ids), "generated": list(out.outputs[0].token_ids)})
    with open(sys.argv[2], "w") as file:
        json.dump(results, file)
    # vLLM 0.32's CPU build often aborts in the interpreter's teardown, after its engine has shut down ("terminate
    # called without an active exception", exit -6): shut the engine down, then exit without that teardown.
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    main()
