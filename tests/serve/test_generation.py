"""The served LoRA pipeline renders exactly what the training previews render, and its lock keeps
concurrent renders with different LoRAs apart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from fluxray.config import LoraConfig, SamplePrompt
from fluxray.model.generate import encode_prompt
from fluxray.model.lora import add_lora, export_state_dict, lora_named_params, save_lora
from fluxray.model.pipeline import load_pipeline
from fluxray.serve.generation import LoraPipeline, _Adapter, adapter_name
from fluxray.train.loop import sample_previews

MAX_LEN = 32
PROMPT = SamplePrompt(prompt="pxco, portrait photo", seed=7, width=64, height=64, guidance=3.5, steps=3,
                      lora_scale=1.0)


@pytest.fixture(scope="module")
def previews(random_flux, tmp_path_factory):
    """Two LoRA files as training writes them, and the previews the training loop renders for them
    (key 0: the base model)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline(str(random_flux))
    lora = LoraConfig(rank=4, alpha=8)  # alpha != rank: the file must carry the scale baked in
    params = add_lora(pipe.transformer, lora, seed=0)
    names = list(lora_named_params(pipe.transformer))
    texts = {PROMPT.prompt: encode_prompt(pipe, PROMPT.prompt, MAX_LEN)}
    images = {}

    class Capture:  # stands in for the tracker: keeps what the loop would log
        def log_image(self, image, key, step):
            if key != "grid":
                images[step] = np.asarray(image)

    files = {}
    g = torch.Generator().manual_seed(1)
    sample_previews(pipe, pipe.transformer, params, None, names, [PROMPT], texts, 0, 1, 0, 0, Capture())
    for k in (1, 2):  # trained weights: B is no longer zero
        values = [p.detach() + 0.3 * torch.randn(p.shape, generator=g) for p in params]
        tensors = export_state_dict(dict(zip(names, values)), lora.scale, "fp32")
        files[k] = save_lora(folder / f"lora{k}.safetensors", tensors, {"name": f"lora{k}"})
        sample_previews(pipe, pipe.transformer, params, tensors, names, [PROMPT], texts, 0, 1, 0, k, Capture())
    return files, images


@pytest.fixture
def served(random_flux):
    return LoraPipeline(load_pipeline(str(random_flux)), MAX_LEN)


def render(served, lora):
    return np.asarray(served.render(PROMPT.prompt, lora=lora, lora_scale=1.0, seed=PROMPT.seed, width=64,
                                    height=64, steps=PROMPT.steps, guidance=PROMPT.guidance))


def test_served_images_equal_the_training_previews(served, previews):
    files, images = previews
    assert not np.array_equal(images[1], images[0]) and not np.array_equal(images[1], images[2])
    assert np.array_equal(render(served, None), images[0])
    assert np.array_equal(render(served, ("a", files[1])), images[1])
    assert np.array_equal(render(served, ("b", files[2])), images[2])
    # Loaded adapters stay out of a base-model render, and leave no state behind.
    assert np.array_equal(render(served, None), images[0])
    assert np.array_equal(render(served, ("a", files[1])), images[1])
    assert served.loaded == {"a", "b"}


def test_lora_scale_zero_is_the_base_model(served, previews):
    files, images = previews
    img = served.render(PROMPT.prompt, lora=("a", files[1]), lora_scale=0.0, seed=PROMPT.seed, width=64, height=64,
                        steps=PROMPT.steps, guidance=PROMPT.guidance)
    assert np.array_equal(np.asarray(img), images[0])
    assert np.array_equal(render(served, ("a", files[1])), images[1])  # the scale is restored


def test_an_evicted_lora_is_unloaded_once_and_reloaded_on_use(served, previews):
    files, images = previews
    served.load("a", files[1])
    adapter = _Adapter(served, "a", files[1])
    adapter.__del__()  # what Serve's LRU does on eviction; Python calls it again at collection
    adapter.__del__()
    assert served.loaded == set()
    assert np.array_equal(render(served, ("a", files[1])), images[1])


def test_concurrent_renders_with_different_loras_do_not_mix(served, previews):
    files, images = previews
    jobs = [("a", files[1]), ("b", files[2]), None] * 4
    with ThreadPoolExecutor(3) as pool:
        out = list(pool.map(lambda lora: render(served, lora), jobs))
    expected = {("a", files[1]): images[1], ("b", files[2]): images[2], None: images[0]}
    for lora, img in zip(jobs, out):
        assert np.array_equal(img, expected[lora])


def test_adapter_names_are_valid_peft_keys():
    names = {adapter_name(i) for i in ("pxco-1a2b", "pxco-1a2b@10", "pxco.v2@10", "pxco_v2@10")}
    assert len(names) == 4 and not any("." in n or "@" in n for n in names)


def test_a_generate_that_takes_too_long_is_cancelled_and_answered_503():
    """Unit test of the ingress's `render` with a stand-in for the generation deployment whose
    replica never answers: the caller gets a GenerationUnavailable (503) naming the setting, and
    the request is cancelled so its replica slot frees."""
    import asyncio

    from types import SimpleNamespace

    from fluxray.serve.app import Api, GenerationUnavailable, ServiceConfig

    class HungResponse:
        cancelled = False

        def __await__(self):
            return asyncio.get_running_loop().create_future().__await__()  # never set

        def cancel(self):
            HungResponse.cancelled = True

    class HungGenerator:
        def options(self, **_):
            return self

        @property
        def render(self):
            return self

        def remote(self, params):
            return HungResponse()

    # The method alone, on the two attributes it reads: Serve's ingress wrapper needs a running Serve.
    api = SimpleNamespace(generator=HungGenerator(), settings=ServiceConfig(generation_timeout_s=0.2),
                          make_way=lambda: asyncio.sleep(0))  # no training in the way
    with pytest.raises(GenerationUnavailable, match=r"no image after 0\.2 s \(generation_timeout_s\)"):
        asyncio.run(Api.func_or_class.render(api, None, {"prompt": "pxco"}))
    assert HungResponse.cancelled


# -- training comes first ------------------------------------------------------------------------

def job(name: str, state: str, demand: dict, run_dir: str = "/nonexistent") -> dict:
    return {"run_name": name, "state": state, "demand": demand, "run_dir": run_dir}


def test_generation_gives_way_to_a_job_that_waits_for_its_resources():
    from fluxray.serve.app import generation_blocked

    need = {"CPU": 1.0, "accel": 1.0}
    for state in ("queued", "starting"):
        e = generation_blocked(need, [job("pxco-1", state, {"CPU": 2.0, "accel": 1.0})], 1, [])
        assert "training comes first: job pxco-1 is waiting for the 1 CPU, 1 accel" in str(e) and e.retry_after == 30
    # A waiting job that needs none of what generation uses does not stop it.
    assert generation_blocked({"GPU": 1.0}, [job("pxco-1", "queued", {"CPU": 2.0})], 1, []) is None


def test_with_no_replica_up_a_generate_that_cannot_start_one_is_503_naming_the_job_and_when(tmp_path):
    from fluxray.serve.app import generation_blocked
    from fluxray.track.local import RunRecord

    RunRecord(tmp_path).set_status(step=10, total=40, sec_per_step=4.0)  # 120 s left
    running = [job("pxco-1", "running", {"CPU": 2.0}, str(tmp_path))]
    e = generation_blocked({"CPU": 1.0}, running, 0, [{"CPU": 0.0}])
    assert str(e) == ("generate: training job pxco-1 holds the 1 CPU a generation replica needs; "
                      "retry when it ends (~2 min)") and e.retry_after == 120
    assert "other Ray work holds" in str(generation_blocked({"CPU": 1.0}, [], 0, [{"CPU": 0.5}]))
    # Room for a replica, or one already up: the request goes through.
    assert generation_blocked({"CPU": 1.0}, running, 0, [{"CPU": 1.0}]) is None
    assert generation_blocked({"CPU": 1.0}, running, 1, []) is None
