"""vLLM's pooling runner on a saved image-text folder, for tests/test_vllm.py, run by the Python of vLLM's own
environment (README's test command makes it with tests/install_vllm.sh). Usage: ``python vllm_embed.py REQUEST.json
RESULT.json``. The request names the folder, texts (with ``tokenization_kwargs``, or none), token ids and image
files; ``LLM.embed`` - what vLLM's ``/v1/embeddings`` serves - embeds each, and the result holds its embeddings
(``texts``, ``ids``, ``images``)."""

import json
import os
import sys


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    from PIL import Image
    from vllm import LLM

    llm = LLM(model=request["model"], runner="pooling", dtype="float32", enforce_eager=True, max_model_len=64, seed=0)

    def embed(prompts: list, **options) -> list[list[float]]:
        return [out.outputs.embedding for out in llm.embed(prompts, use_tqdm=False, **options)] if prompts else []

    images = [Image.open(path).convert("RGB") for path in request["images"]]
    result = {
        "texts": embed(request["texts"], tokenization_kwargs=request["tokenization_kwargs"]),
        "ids": embed([{"prompt_token_ids": ids} for ids in request["ids"]]),
        # vLLM takes a SigLIP image alone: an empty prompt
        "images": embed([{"prompt": "", "multi_modal_data": {"image": image}} for image in images]),
    }
    with open(sys.argv[2], "w") as file:
        json.dump(result, file)
    # vLLM 0.32's CPU build often aborts in the interpreter's teardown, after its engine has shut down ("terminate
    # called without an active exception", exit -6): shut the engine down, then exit without that teardown.
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    main()
