"""Training stages on the tiny model (CPU): data conversion, recipes -> TRL configs, one SFT step,
one GRPO step, and resuming a killed run from its checkpoint."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from egm.data.archives import extract_archive, part_files
from egm.data.demo import write_demo_dataset
from egm.data.parquet import rewrite_image_paths
from egm.data.paths import SFT_DATA
from egm.data.rows import BadRow, split_user_turn
from egm.train import common, recipes
from egm.train.data import RowCounter, iter_sft_rows, rl_rows, sft_row

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "config" / "recipes"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo data set with its images extracted and the RL parquet rewritten, like the DAG."""
    root = tmp_path_factory.mktemp("train-data")
    write_demo_dataset(root / "ds", seed=3, n_train_images=6, n_eval_per_split=2)
    extract_archive(part_files(root / "ds"), root / "images")
    extract_archive([root / "ds" / "coco_flip.tar"], root / "images")
    for part in ("train", "val"):
        rewrite_image_paths(root / "ds" / "processed_rl_data" / f"{part}_grounding.parquet",
                            root / "rl" / f"{part}.parquet", str(root / "images"))
    return root


def tiny_sft_recipe(**extra):
    recipe = dict(
        learning_rate=1e-3, lr_scheduler="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        epochs=1, global_batch_size=2, micro_batch_size=2, max_length=512, image_min_pixels=9216,
        image_max_pixels=9216, freeze_vision_tower=True, save_steps=2, logging_steps=1, seed=0,
    )
    recipe.update(extra)
    return recipe


def tiny_rl_recipe(**extra):
    recipe = dict(
        group_size=2, prompts_per_step=2, micro_batch_size=4, max_new_tokens=8, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, clip_eps=0.2, kl_beta=0.0, loss_aggregation="token-mean",
        reward_normalization="group", image_min_pixels=9216, image_max_pixels=9216, save_steps=1,
        logging_steps=1, seed=0,
    )
    recipe.update(extra)
    return recipe


def weights(model_dir):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(path))
    return out


# ------------------------------------------------------------------ data


def test_sft_rows_become_prompt_completion_with_the_image_first(demo_data):
    counter = RowCounter("sft")
    rows = list(iter_sft_rows(demo_data / "ds" / SFT_DATA.format(data="raw"),
                              str(demo_data / "images"), counter))
    assert rows and counter.bad == 0
    first = rows[0]
    assert first["prompt"][0]["role"] == "user"
    text = first["prompt"][0]["content"]
    assert text.startswith("Locate ") and text.endswith("using JSON format.")  # the SFT prompt's period
    assert first["completion"][0]["role"] == "assistant" and "</think>" in first["completion"][0]["content"]
    assert Path(first["images"][0]).is_file() and "/images/coco" in first["images"][0]
    assert any("/coco_flip/" in r["images"][0] for r in rows)


def test_bad_sft_rows_are_counted_not_fatal(tmp_path, demo_data):
    good = json.loads((demo_data / "ds" / SFT_DATA.format(data="raw"))
                      .read_text().splitlines()[0])
    missing = {**good, "images": ["data/coco/train2014/nope.jpg"]}
    two = {**good, "images": good["images"] * 2}
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([json.dumps(good), "{broken", json.dumps(missing), json.dumps(two), ""]))
    counter = RowCounter(str(path))
    rows = list(iter_sft_rows(path, str(demo_data / "images"), counter))
    assert len(rows) == 1 and counter.bad == 3


def test_user_turn_placeholders():
    assert split_user_turn("<image>\nLocate x.", 1) == "Locate x."
    with pytest.raises(BadRow):
        split_user_turn("Locate <image> x.", 1)
    with pytest.raises(BadRow):
        split_user_turn("Locate x.", 1)
    with pytest.raises(BadRow):
        sft_row({"messages": [{"role": "user", "content": "<image>\nx"}], "images": ["a"]}, "/r")


def test_rl_rows_carry_the_reward_columns(demo_data):
    counter = RowCounter("rl")
    rows = rl_rows(demo_data / "rl" / "train.parquet", counter)
    assert rows and counter.bad == 0
    row = rows[0]
    assert row["prompt"][0]["content"].endswith("using JSON format")  # the RL/eval prompt: no period
    assert row["split"] == "train" and len(row["ground_truth"]) == 4 and row["width"] == 96
    assert {r["split"] for r in rl_rows(demo_data / "rl" / "val.parquet", counter)} == {"test"}


# ------------------------------------------------------------------ recipes


def test_paper_sft_recipe_maps_to_sftconfig():
    from trl import SFTConfig

    recipe = recipes.load_recipe(RECIPES / "sft.yaml")
    on8 = recipes.sft_args(recipe, world_size=8, on_gpu=True)
    assert on8["per_device_train_batch_size"] * on8["gradient_accumulation_steps"] * 8 == 128
    assert on8["gradient_accumulation_steps"] == 2  # 8 GPUs x 8 x 2, as the paper ran it
    assert on8["learning_rate"] == 1e-5 and on8["lr_scheduler_type"] == "cosine"
    assert on8["warmup_steps"] == 0.03 and on8["weight_decay"] == 0.0 and on8["max_grad_norm"] == 1.0
    assert on8["num_train_epochs"] == 1 and on8["max_length"] == 8192 and on8["bf16"] is True
    assert on8["completion_only_loss"] is True
    assert json.loads(Path(on8["deepspeed"]).read_text())["zero_optimization"]["stage"] == 3
    on1 = recipes.sft_args(recipe, world_size=1, on_gpu=False)
    assert on1["gradient_accumulation_steps"] == 16 and on1["bf16"] is False and "deepspeed" not in on1
    SFTConfig(output_dir="unused", **on1)  # TRL accepts every argument


@pytest.mark.parametrize("name", ["rl_verl.yaml", "rl_areal.yaml"])
def test_paper_rl_recipes_map_to_grpoconfig(name):
    from trl import GRPOConfig

    recipe = recipes.load_recipe(RECIPES / name)
    args = recipes.rl_args(recipe, world_size=8, on_gpu=True, vllm_available=True)
    completions = recipe["prompts_per_step"] * recipe["group_size"]
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * 8 == completions
    assert args["steps_per_generation"] == args["gradient_accumulation_steps"]  # one update per rollout batch
    assert args["num_generations"] == recipe["group_size"]
    assert args["max_completion_length"] == 2048
    assert (args["temperature"], args["top_p"], args["top_k"]) == (0.7, 0.9, 50)
    assert args["use_vllm"] and args["vllm_mode"] == "colocate"
    # vLLM's context holds a prompt and the longest answer, not Qwen3-VL's 262144 positions.
    assert args["vllm_max_model_length"] == 4096 > args["max_completion_length"]
    assert args["loss_type"] == "dapo"  # token-mean
    assert args["scale_rewards"] == "group"
    if name == "rl_verl.yaml":
        assert args["importance_sampling_level"] == "sequence"  # GSPO
        assert args["beta"] == 0.005 and args["learning_rate"] == 3e-6 and args["warmup_steps"] == 30
        assert args["vllm_importance_sampling_correction"] is False
    else:
        assert args["beta"] == 0.0 and args["epsilon"] == 0.2 and args["warmup_steps"] == 0.1
        assert args["vllm_importance_sampling_correction"] is True
        assert args["vllm_importance_sampling_mode"] == "token_truncate"
        assert args["vllm_importance_sampling_clip_max"] == 5.0
        assert set(recipes.recorded_only(recipe, "rl")) == {
            "batch_advantage_normalization", "decoupled_loss", "max_head_offpolicyness", "rollout_gpus"}
    # On this CPU machine: transformers generate, no IS correction, and GRPOConfig takes it all.
    cpu = recipes.rl_args(recipe, world_size=1, on_gpu=False, vllm_available=False)
    assert cpu["use_vllm"] is False and cpu["vllm_importance_sampling_correction"] is False
    GRPOConfig(output_dir="unused", **cpu)


def test_every_shipped_recipe_is_valid(tmp_path):
    from trl import GRPOConfig, SFTConfig

    shipped = {path.name: recipes.load_recipe(path) for path in sorted(RECIPES.glob("*.yaml"))}
    # Every recipe a shipped config trains with is among those checked here.
    named = set()
    for config in (REPO / "config").glob("*.yaml"):
        named |= {Path(m).name for m in re.findall(r"^\s*recipe:\s*(\S+)", config.read_text(), re.M)}
    assert named and named <= set(shipped), (sorted(named), sorted(shipped))
    assert {recipe.get("stage") for recipe in shipped.values()} == {"sft", "rl"}

    for name, recipe in shipped.items():
        # TRL's own config class takes the arguments and holds what the recipe says.
        if recipe["stage"] == "sft":
            config = SFTConfig(output_dir=str(tmp_path / name), **recipes.sft_args(recipe))
            batch = recipe["global_batch_size"]
        else:
            config = GRPOConfig(output_dir=str(tmp_path / name), **recipes.rl_args(recipe))
            batch = recipe["prompts_per_step"] * recipe["group_size"]
            assert config.num_generations == recipe["group_size"], name
            assert config.max_completion_length == recipe["max_new_tokens"], name
            assert (config.temperature, config.top_p, config.top_k) == (
                recipe["temperature"], recipe["top_p"], recipe["top_k"]), name
        assert config.per_device_train_batch_size * config.gradient_accumulation_steps == batch, name
        assert config.learning_rate == recipe["learning_rate"], name
        for key, field in (("epochs", "num_train_epochs"), ("weight_decay", "weight_decay"),
                           ("max_grad_norm", "max_grad_norm"), ("seed", "seed")):
            if key in recipe:
                assert getattr(config, field) == recipe[key], (name, key)


def test_recipe_errors():
    recipe = recipes.load_recipe(RECIPES / "rl_verl.yaml")
    with pytest.raises(recipes.RecipeError, match="unknown"):
        recipes.rl_args({**recipe, "learning_rte": 1.0})
    with pytest.raises(recipes.RecipeError, match="not a multiple"):
        recipes.rl_args({**recipe, "micro_batch_size": 7})
    with pytest.raises(recipes.RecipeError, match="vLLM"):
        recipes.rl_args({**recipe, "rollout": "vllm"}, vllm_available=False)
    with pytest.raises(recipes.RecipeError, match="stage"):
        recipes.sft_args(recipe)
    # vLLM resizes images with the model directory's processor, never with a recipe's pixel budget.
    with pytest.raises(recipes.RecipeError, match="image_max_pixels"):
        recipes.rl_args({**recipe, "image_max_pixels": 50176}, on_gpu=True, vllm_available=True)
    assert recipes.rl_args({**recipe, "image_max_pixels": 50176})["use_vllm"] is False  # generate: fine


def test_vllm_context_defaults_to_prompt_room_plus_the_answer():
    recipe = recipes.load_recipe(RECIPES / "rl_areal.yaml")
    del recipe["vllm_max_model_length"]
    args = recipes.rl_args({**recipe, "max_new_tokens": 256}, on_gpu=True, vllm_available=True)
    assert args["vllm_max_model_length"] == recipes.VLLM_PROMPT_TOKENS + 256
    assert "vllm_max_model_length" not in recipes.rl_args(recipe)  # generate rollouts: no vLLM settings


def test_demo_rl_samples_with_generate_even_where_vllm_is_installed():
    # The demo runs on the CPU; its recipe names its rollout path instead of leaving it to `auto`.
    recipe = recipes.load_recipe(RECIPES / "demo_rl.yaml")
    assert recipe["rollout"] == "hf"
    assert recipes.rl_args(recipe, on_gpu=True, vllm_available=True)["use_vllm"] is False


def _gather_in_process_group(rank, world, init_file, out):
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from egm.train.cost import all_processes, this_process

    records = all_processes(this_process())
    Path(out).with_suffix(f".{rank}").write_text(json.dumps(records))
    dist.destroy_process_group()


def test_training_cost_names_every_process_by_rank(tmp_path):
    """Under several processes each rank's record reaches every rank (rank 0 writes the manifest)."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_in_process_group, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        records = json.loads((tmp_path / f"out.{rank}").read_text())
        assert [r["rank"] for r in records] == [0, 1] and {r["device"] for r in records} == {"cpu"}


def test_zero3_partitioned_parameters_are_counted_whole():
    """Under ZeRO-3 a parameter's local tensor is empty; its size is `ds_numel`."""
    model = torch.nn.Module()
    model.visual = torch.nn.Module()
    model.visual.blocks = torch.nn.Linear(4, 4, bias=False)
    model.head = torch.nn.Linear(4, 2, bias=False)
    for module, full in ((model.visual.blocks, 16), (model.head, 8)):
        module.weight.data = torch.empty(0)
        module.weight.ds_numel = full
    assert common.freeze_vision_tower(model) == {"frozen_params": 16, "trained_params": 8}
    assert not model.visual.blocks.weight.requires_grad and model.head.weight.requires_grad


def test_trained_weights_keep_the_start_models_names(tiny_dir, tmp_path):
    """A model loaded with every renaming transformers knows (as its ZeRO-3 loader keeps them)
    saves Qwen3-VL's text weights under other names; forgetting them saves the start's names."""
    from transformers import AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    model._weight_conversions = get_model_conversion_mapping(model)  # legacy renamings included
    common.keep_checkpoint_names(model)
    model.save_pretrained(tmp_path / "saved")
    assert common.weight_names(tmp_path / "saved") == common.weight_names(tiny_dir)
    common.check_weight_names(tiny_dir, tmp_path / "saved")

    from safetensors.torch import load_file, save_file

    renamed = {k.replace("model.language_model.", "model.language_model.model."): v
               for k, v in load_file(tmp_path / "saved" / "model.safetensors").items()}
    save_file(renamed, tmp_path / "saved" / "model.safetensors")
    with pytest.raises(RuntimeError, match="not named like the start model"):
        common.write_model_dir(tmp_path / "saved", tiny_dir, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_launcher_sized_from_the_gpu_count(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert common.launch_command(0, ["sft"]) is None
    assert common.launch_command(1, ["sft"]) is None
    command = common.launch_command(8, ["sft", "--gpus", "8"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert command[-4:] == ["egm", "sft", "--gpus", "8"]
    monkeypatch.setenv("LOCAL_RANK", "3")  # already a torchrun worker
    assert common.launch_command(8, ["sft"]) is None


# ------------------------------------------------------------------ training


def run_sft(tiny_dir, demo_data, out, max_steps, callbacks=None, **recipe):
    from egm.train.sft import train_sft

    return train_sft(
        tiny_dir, demo_data / "ds" / SFT_DATA.format(data="raw"),
        str(demo_data / "images"), out / "sft", out / "sft.json", out / ".work" / "sft",
        {"run": "t", "recipe": tiny_sft_recipe(**recipe), "max_steps": max_steps, "limit": None},
        callbacks=callbacks,
    )


def test_one_sft_step_trains_llm_and_merger_not_the_vit(tiny_dir, demo_data, tmp_path):
    manifest = run_sft(tiny_dir, demo_data, tmp_path, max_steps=1)
    assert manifest["global_step"] == 1
    loss = manifest["log"]["first"]["loss"]
    assert 0 < loss < 100
    # What the step cost, per process (one here, on the CPU: no GPU memory to report).
    cost = manifest["cost"]
    assert len(cost["step_s"]) == 1 and cost["step_s"][0] > 0
    assert cost["processes"] == [{"rank": 0, "device": "cpu", "peak_allocated_gib": None, "peak_reserved_gib": None}]
    before, after = weights(tiny_dir), weights(tmp_path / "sft")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.language_model.") for k in changed)
    assert any(".visual.merger." in k for k in changed)
    assert not any(".visual.blocks." in k or ".visual.patch_embed." in k for k in changed)
    # The directory is a servable model: the start's tokenizer/processor files, the new weights.
    out = tmp_path / "sft"
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja", "config.json", "training.json"):
        assert (out / name).exists(), name
    assert (out / "preprocessor_config.json").read_bytes() == (tiny_dir / "preprocessor_config.json").read_bytes()
    assert json.loads((tmp_path / "sft.json").read_text())["files"]
    assert not (tmp_path / ".work" / "sft").exists()  # checkpoints go once the manifest exists
    from egm.infer.base import Request
    from egm.options import SamplingOptions
    from egm.infer.backends.hf import HFEngine

    image = next((demo_data / "images" / "coco" / "train2014").iterdir())
    engine = HFEngine(str(out), SamplingOptions(max_tokens=4))
    assert len(engine.generate([Request("0", str(image), "Locate the red circle")])) == 1


class Killed(RuntimeError):
    pass


def test_killed_sft_resumes_from_its_last_checkpoint(tiny_dir, demo_data, tmp_path):
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Killed("simulated kill after the step-2 checkpoint")

    with pytest.raises(Killed):
        run_sft(tiny_dir, demo_data, tmp_path / "a", max_steps=4, callbacks=[KillAfterSave()])
    work = tmp_path / "a" / ".work" / "sft" / "checkpoints"
    assert common.last_checkpoint(work).endswith("checkpoint-2")
    assert not (tmp_path / "a" / "sft").exists() and not (tmp_path / "a" / "sft.json").exists()

    class Steps(TrainerCallback):
        done = []

        def on_step_end(self, args, state, control, **kwargs):
            self.done.append(state.global_step)

    manifest = run_sft(tiny_dir, demo_data, tmp_path / "a", max_steps=4, callbacks=[Steps()])
    training = json.loads((tmp_path / "a" / "sft" / "training.json").read_text())
    assert training["resumed_from"].endswith("checkpoint-2")
    assert manifest["global_step"] == 4
    assert Steps.done == [3, 4]  # the resumed run did only what was left
    assert len(manifest["cost"]["step_s"]) == 2  # the steps this process ran
    assert [e["step"] for e in training["log_history"] if "loss" in e] == [1, 2, 3, 4]

    # Same result as a run that was never interrupted (data order, optimizer and RNG restored).
    run_sft(tiny_dir, demo_data, tmp_path / "b", max_steps=4)
    resumed, straight = weights(tmp_path / "a" / "sft"), weights(tmp_path / "b" / "sft")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


def test_checkpoints_of_other_settings_are_not_resumed(tiny_dir, demo_data, tmp_path):
    work = tmp_path / ".work" / "sft"
    common.prepare_work_dir(work, {"options_sha256": "other"})
    (work / "checkpoints" / "checkpoint-9").mkdir(parents=True)
    (work / "checkpoints" / "checkpoint-9" / "trainer_state.json").write_text("{}")
    manifest = run_sft(tiny_dir, demo_data, tmp_path, max_steps=1)
    assert manifest["global_step"] == 1
    assert json.loads((tmp_path / "sft" / "training.json").read_text())["resumed_from"] is None


def test_one_grpo_step(tiny_dir, demo_data, tmp_path):
    from egm.train import rl

    calls = []

    def token_reward(prompts, completions, completion_ids, ground_truth, width, height, split, **_):
        # The random model never writes a box, so the IoU reward would be 0 for every sample
        # and GRPO's advantages with it; a reward that differs between samples makes it learn.
        calls.append(len(completions))
        return [float(sum(ids) % 97) for ids in completion_ids]

    manifest = rl.train_rl(
        tiny_dir, demo_data / "rl" / "train.parquet", None, tmp_path / "rl", tmp_path / "rl.json",
        tmp_path / ".work" / "rl", {"run": "t", "recipe": tiny_rl_recipe(), "max_steps": 1, "limit": 8},
        reward_funcs=[token_reward],
    )
    assert manifest["global_step"] == 1 and calls == [4]  # 2 prompts x 2 samples
    assert len(manifest["cost"]["step_s"]) == 1  # generation included: it runs inside the step
    first = manifest["log"]["first"]
    assert "reward" in first and "reward_std" in first and torch.isfinite(torch.tensor(first["loss"]))
    before, after = weights(tiny_dir), weights(tmp_path / "rl")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    training = json.loads((tmp_path / "rl" / "training.json").read_text())
    assert training["rollout"] == "transformers-generate" and "vllm_prompts" not in training
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "rl")  # the checkpoint reloads


class VLLMGenerationStandIn:
    """Stands in for TRL's VLLMGeneration, whose vLLM needs a GPU: it keeps the prompts it is sent."""

    def generate(self, prompts, images, num_generations, profiler=None):
        self.sent = prompts
        return "completions"


def test_vllm_gets_one_image_placeholder_per_image(tiny_dir):
    from PIL import Image

    from egm.models.inputs import IMAGE_TOKEN
    from egm.train import rl
    from egm.train.processing import load_processor

    processor = load_processor(tiny_dir)
    pad = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (96, 96))},
                                             {"type": "text", "text": "Locate the dog."}]}]
    # What TRL sends (the processor's ids, placeholders expanded) and what vLLM expands itself.
    expanded = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]
    single = processor.tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=False))["input_ids"]
    assert expanded.count(pad) == 9 and single.count(pad) == 1
    assert rl.collapse_image_placeholders(expanded, pad) == single

    trainer = type("Trainer", (), {})()
    trainer.vllm_generation = VLLMGenerationStandIn()
    assert rl.send_vllm_unexpanded_prompts(trainer, pad)
    assert trainer.vllm_generation.generate(prompts=[expanded], images=[["image"]], num_generations=2) == "completions"
    assert trainer.vllm_generation.sent == [single]
    trainer.vllm_generation.generate(prompts=[[1, pad, pad, 2]], images=None, num_generations=2)
    assert trainer.vllm_generation.sent == [[1, pad, pad, 2]]  # no image: sent as it is
    assert not rl.send_vllm_unexpanded_prompts(type("Trainer", (), {})(), pad)  # generate rollouts: nothing to route


class VLLMSyncStandIn:
    """Stands in for TRL's VLLMGeneration around a weight sync (vLLM needs a GPU): it logs the sync,
    and in colocate mode the engine's encoder-cache reset, in the order they happen."""

    def __init__(self, mode: str, base_url: str = ""):
        self.mode, self.calls = mode, []
        engine = type("Engine", (), {"reset_encoder_cache": lambda _: self.calls.append("reset_encoder_cache")})()
        self.llm = type("LLM", (), {"llm_engine": engine})()
        self.accelerator = type("Accelerator", (), {"is_main_process": True})()
        import requests

        self.vllm_client = type("Client", (), {"session": requests.Session(), "base_url": base_url})()

    def sync_weights(self):
        self.calls.append("sync_weights")


def test_vllm_forgets_image_encodings_after_each_weight_sync():
    """vLLM caches an image's vision-encoder output by its content; after a sync that output is of
    the old weights. Colocate: the engine's reset after every sync; server mode: the server's
    /reset_encoder_cache (here a real HTTP server on this machine that logs what it is sent)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from egm.train import rl

    trainer = type("Trainer", (), {})()
    trainer.vllm_generation = VLLMSyncStandIn("colocate")
    assert "reset_encoder_cache" in rl.forget_image_embeddings_on_sync(trainer)
    trainer.vllm_generation.sync_weights()
    trainer.vllm_generation.sync_weights()
    assert trainer.vllm_generation.calls == ["sync_weights", "reset_encoder_cache"] * 2

    posted = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            posted.append(self.path)
            self.send_response(200 if self.path == "/reset_encoder_cache" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        trainer.vllm_generation = VLLMSyncStandIn("server", f"http://127.0.0.1:{server.server_port}")
        rl.forget_image_embeddings_on_sync(trainer)
        trainer.vllm_generation.sync_weights()
        assert posted == ["/reset_encoder_cache"] and trainer.vllm_generation.calls == ["sync_weights"]
        trainer.vllm_generation.vllm_client.base_url += "/no-such-server-path"
        with pytest.raises(RuntimeError, match="reset_encoder_cache: 404"):
            trainer.vllm_generation.sync_weights()
    finally:
        server.shutdown()
    assert rl.forget_image_embeddings_on_sync(type("Trainer", (), {})()) is None  # generate rollouts


def test_grpo_uses_the_grounding_reward_by_default(tiny_dir, demo_data, tmp_path):
    from egm.train import rl

    manifest = rl.train_rl(
        tiny_dir, demo_data / "rl" / "train.parquet", demo_data / "rl" / "val.parquet", tmp_path / "rl",
        tmp_path / "rl.json", tmp_path / ".work" / "rl",
        {"run": "t", "recipe": tiny_rl_recipe(eval_steps=1), "max_steps": 1, "limit": 2},
    )
    last = manifest["log"]["last"]
    assert "rewards/grounding_reward/mean" in last  # logged under the reward's name
    assert "eval_rewards/grounding_reward/mean" in last  # the val parquet ("test" split) evaluated


def test_grpo_learns_from_the_grounding_reward_on_boxes(tiny_dir, demo_data, tmp_path, monkeypatch):
    """GRPO with the pipeline's own reward (none passed in): every logged reward is
    `grounding_reward` of the logged completion against its row's box, and it varies in a group."""
    import pandas as pd
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from egm.train import rl
    from egm.train.rewards import extract_box, grounding_reward

    # The random model never writes a box unaided. Sampling only digits, commas and spaces makes it
    # write numbers, whose last four are a box to the reward (brackets are left out: a random last
    # group mostly holds fewer than four numbers, which scores 0 for every sample alike).
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    box_tokens = {i for i in range(len(tokenizer)) if (t := tokenizer.decode([i])) and set(t) <= set("0123456789 ,")}
    assert {tokenizer.convert_tokens_to_ids(d) for d in "0123456789"} <= box_tokens
    suppressed = sorted(set(range(len(tokenizer))) - box_tokens)
    real_config = trl.GRPOConfig

    def config_logging_completions(**kwargs):
        return real_config(**kwargs, log_completions=True, num_completions_to_print=1,
                           generation_kwargs={"suppress_tokens": suppressed})

    monkeypatch.setattr(trl, "GRPOConfig", config_logging_completions)

    logged = tmp_path / "completions"

    class KeepCompletions(TrainerCallback):
        # TRL writes them under the work dir, which the stage deletes once the model is written.
        def on_train_end(self, args, state, control, **kwargs):
            import shutil

            shutil.copytree(Path(args.output_dir) / "completions", logged)

    steps = 3
    manifest = rl.train_rl(
        tiny_dir, demo_data / "rl" / "train.parquet", None, tmp_path / "rl", tmp_path / "rl.json",
        tmp_path / ".work" / "rl",
        {"run": "t", "recipe": tiny_rl_recipe(group_size=4, prompts_per_step=2, micro_batch_size=8, max_new_tokens=24),
         "max_steps": steps, "limit": 2},
        callbacks=[KeepCompletions()],
    )
    assert manifest["global_step"] == steps

    # Two rows of different prompts, so a logged prompt names its row (and its box).
    train_rows = rl_rows(demo_data / "rl" / "train.parquet", RowCounter("rl"), 2)
    rows = {row["prompt"][-1]["content"]: row for row in train_rows}
    assert len(rows) == 2

    history = json.loads((tmp_path / "rl" / "training.json").read_text())["log_history"]
    by_step = {entry["step"]: entry for entry in history if "rewards/grounding_reward/mean" in entry}
    assert sorted(by_step) == list(range(1, steps + 1))
    varied_groups = boxes = 0
    for step in range(1, steps + 1):
        table = pd.read_parquet(logged / f"completions_{step:05d}.parquet")
        assert len(table) == 8 and "grounding_reward" in table
        recomputed = []
        for prompt, completion, reward in zip(table["prompt"], table["completion"], table["grounding_reward"]):
            row = rows[_last_text(prompt)]
            text = _last_text(completion)
            expected = grounding_reward(text, list(row["ground_truth"]), row["width"], row["height"], row["split"])
            # TRL holds rewards as float32: the logged value is exactly the reward in that precision.
            assert reward == float(torch.tensor(expected, dtype=torch.float32)), (step, text, row["ground_truth"])
            recomputed.append(expected)
            boxes += extract_box(text) is not None
        groups = pd.Series(recomputed).groupby(table["prompt"].map(_last_text))
        assert len(groups) == 2 and all(len(g) == 4 for _, g in groups)
        varied_groups += sum(g.nunique() > 1 for _, g in groups)
        assert by_step[step]["rewards/grounding_reward/mean"] == pytest.approx(sum(recomputed) / len(recomputed))
    assert boxes > 0 and varied_groups > 0, (boxes, varied_groups)  # a learning signal from boxes


def _last_text(messages):
    """The text of the last message of a logged conversation (content as a string or as parts)."""
    content = list(messages)[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")
