"""Build a tiny random-weight vision-language model of the UI-TARS-1.5 shape.

UI-TARS-1.5 checkpoints load as ``Qwen2_5_VLForConditionalGeneration``; this script makes a
~2 M parameter model of that class with a real byte-level BPE tokenizer, a Qwen2.5-VL
processor and a chat template, so vLLM serves it exactly as it would serve the real
checkpoint (same architecture, same multimodal processing, same chat format). No weights are
downloaded; everything is built from a fixed seed, so two builds are identical.

    python -m agentenv.tiny_model [--out DIR] [--force]     (or scripts/make_tiny_model.py)

Default output: $AGENTENV_HOME/models/tiny-uitars (AGENTENV_HOME defaults to ~/.cache/agentenv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

# The image processor's pixel bounds. The vLLM server gets the same numbers through
# --mm-processor-kwargs and the agent maps coordinates with them (agentenv.config).
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 256
SEED = 0
VOCAB_SIZE = 4096
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<|box_start|>", "<|box_end|>",
]

# Qwen2-VL's chat template, reduced to what UI-TARS uses: text and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small corpus in the shape of UI-TARS conversations, so common pieces are single tokens.
CORPUS = [
    "You are a GUI agent. You are given a task and your action history, with screenshots.",
    "You need to perform the next action to complete the task.",
    "Thought: I should click the button. Action: click(start_box='(100,200)')",
    "Action: left_double(start_box='(512,384)')", "Action: right_single(start_box='(5,9)')",
    "Action: drag(start_box='(1,2)', end_box='(3,4)')", "Action: hotkey(key='ctrl c')",
    "Action: type(content='hello world\\n')", "Action: scroll(start_box='(7,8)', direction='down')",
    "Action: wait()", "Action: finished(content='done')", "Action: call_user()",
    "open the text editor and type the sentence, then save the file in the home folder",
    "0123456789 ,.;:'\"()[]{}<>=+-*/_ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "## Output Format ## Action Space ## Note ## User Instruction Use English in Thought part.",
]


def default_out() -> Path:
    home = Path(os.environ.get("AGENTENV_HOME", Path.home() / ".cache" / "agentenv"))
    return home / "models" / "tiny-uitars"


def recipe_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build(out: Path, seed: int = SEED) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256,
            fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,  # as UI-TARS-1.5-7B; a tied head is not reloaded in place by vLLM
        torch_dtype="float32",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    ).save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "agentenv_tiny.json").write_text(json.dumps({
        "recipe": recipe_hash(), "seed": seed, "params": n_params,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "architecture": "Qwen2_5_VLForConditionalGeneration",
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def build_lora(out: Path, base: Path, seed: int, rank: int = 8) -> None:
    """A LoRA adapter (PEFT format) on the tiny model's attention q/v projections, random weights
    from ``seed``: new weights of the size a LoRA update sends, for tests of runtime updates."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    kv = hidden // text["num_attention_heads"] * text["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, width in (("q_proj", hidden), ("v_proj", kv)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[pre + ".lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.5
            tensors[pre + ".lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base), "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_out())
    ap.add_argument("--seed", type=int, default=SEED,
                    help="weights seed (another seed: a checkpoint of the same shape, e.g. new weights to load)")
    ap.add_argument("--lora", type=Path, default=None, metavar="DIR",
                    help="instead: write a LoRA adapter for the model at --out into DIR (weights from --seed)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.lora is not None:
        build_lora(args.lora, args.out, args.seed)
        return 0
    marker = args.out / "agentenv_tiny.json"
    if not args.force and marker.exists():
        info = json.loads(marker.read_text())
        if info.get("recipe") == recipe_hash() and info.get("seed", SEED) == args.seed:
            if not args.quiet:
                print(f"tiny model up to date: {args.out}")
            return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    build(args.out, args.seed)
    info = json.loads(marker.read_text())
    print(f"tiny model built: {args.out} ({info['params']:,} parameters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
