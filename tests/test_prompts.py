"""Validation prompts: the prompts-file reader and its refusals, encoding equal to diffusers'
QwenImagePipeline.encode_prompt (tiny models from make_tiny), the encoded file and the CLI."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.make_tiny import TEXT_HIDDEN
from megatron_qwen_image.prompts import (PROMPTS_FORMAT, PROMPTS_VERSION, PromptsFileError, PromptSpec, check_encoded,
                                         encode_prompts, load_encoded, main, read_prompts_file, save_encoded)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

YAML = """\
- A red cat sitting on a mat.
- prompt: 一张海报，上面写着“你好世界”。
  negative_prompt: blurry, low quality
  width: 64
  seed: 7
- {prompt: hello, height: 32}
"""


@pytest.fixture(scope="module")
def encoder(pipe):
    return QwenTextEncoder(pipe.text_encoder, pipe.tokenizer)  # batch_size 8, as the CLI's


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_list_with_defaults(tmp_path):
    specs = read_prompts_file(_write(tmp_path, "p.yaml", YAML), default_width=512, default_height=256)
    assert specs == [
        PromptSpec("A red cat sitting on a mat.", None, 512, 256, 0),
        PromptSpec("一张海报，上面写着“你好世界”。", "blurry, low quality", 64, 256, 7),
        PromptSpec("hello", None, 512, 32, 2),  # the seed defaults to the entry's index
    ]
    assert specs[2].origin.endswith("p.yaml, item 2")
    assert read_prompts_file(_write(tmp_path, "q.yml", "prompts:\n  - a\n  - {prompt: b, seed: 0}\n"))[1] == \
        PromptSpec("b", width=1024, height=1024, seed=0)
    json_specs = read_prompts_file(_write(tmp_path, "r.json", '[{"prompt": "a", "width": 32}]'))
    assert json_specs == [PromptSpec("a", width=32)]


def test_jsonl_skips_blank_and_comment_lines(tmp_path):
    text = ('# validation prompts\n{"prompt": "a cat", "seed": 3}\n\n  # another comment\n'
            '{"prompt": "a dog"}\n"a bird"\n')
    specs = read_prompts_file(_write(tmp_path, "p.jsonl", text), default_width=64, default_height=64)
    assert [(s.prompt, s.seed) for s in specs] == [("a cat", 3), ("a dog", 1), ("a bird", 2)]
    assert specs[1].origin.endswith("p.jsonl, line 5")


BAD_ENTRIES = [
    # (file name, content, what the one-line message must contain)
    ("a.yaml", "- {promt: a cat}\n", ["item 0", "unknown field 'promt'", "did you mean 'prompt'"]),
    ("a.jsonl", '{"prompt": "a"}\n{"prompt": "b", "negative": "c"}\n',
     ["line 2", "unknown field 'negative'", "did you mean 'negative_prompt'"]),
    ("a.yaml", "- {prompt: a, colour: red}\n",
     ["item 0", "unknown field 'colour'", "allowed: prompt, negative_prompt"]),
    ("a.yaml", "- a\n- {seed: 1}\n", ["item 1", "missing field 'prompt'"]),
    ("a.jsonl", '{"prompt": "  "}\n', ["line 1", "field 'prompt'", "non-empty string"]),
    ("a.yaml", "- {prompt: 12}\n", ["item 0", "field 'prompt'", "got 12"]),
    ("a.yaml", "- {prompt: a, negative_prompt: 3}\n", ["item 0", "field 'negative_prompt'"]),
    ("a.yaml", "- a\n- b\n- {prompt: a, width: 100}\n", ["item 2", "field 'width'", "divisible by 16", "got 100"]),
    ("a.jsonl", '{"prompt": "a", "height": 0}\n', ["line 1", "field 'height'", "positive integer"]),
    ("a.jsonl", '{"prompt": "a", "height": -16}\n', ["line 1", "field 'height'"]),
    ("a.jsonl", '{"prompt": "a", "width": "512"}\n', ["line 1", "field 'width'", "got '512'"]),
    ("a.yaml", "- {prompt: a, width: yes}\n", ["item 0", "field 'width'", "got True"]),
    ("a.jsonl", '{"prompt": "a", "seed": -1}\n', ["line 1", "field 'seed'", "got -1"]),
    ("a.yaml", "- {prompt: a, seed: 1.5}\n", ["item 0", "field 'seed'", "got 1.5"]),
    ("a.yaml", "- [a, b]\n", ["item 0", "an entry is a prompt string or a mapping"]),
    ("a.yaml", "", ["holds no prompts"]),
    ("a.yaml", "prompts: []\n", ["holds no prompts"]),
    ("a.jsonl", "# nothing\n\n", ["holds no prompts"]),
    ("a.yaml", "- prompt: [unclosed\n", ["YAML syntax error at line"]),
    ("a.jsonl", '{"prompt": "a"}\n{"prompt": b}\n', ["line 2", "invalid JSON"]),
    ("a.json", '[{"prompt": "a"},]', ["invalid JSON at line 1"]),
    ("a.yaml", "prompt:\n  - a\n", ["unknown top-level key 'prompt'", "did you mean 'prompts'"]),
    ("a.yaml", "42\n", ["must hold a list of prompts"]),
    ("a.txt", "a cat\n", ["unknown file type '.txt'", ".jsonl"]),
]


@pytest.mark.parametrize("name, text, expected", BAD_ENTRIES, ids=[f"{n}:{e[-1]}" for n, _, e in BAD_ENTRIES])
def test_bad_prompts_file_is_one_line_naming_entry_and_field(tmp_path, name, text, expected):
    path = _write(tmp_path, name, text)
    with pytest.raises(PromptsFileError) as e:
        read_prompts_file(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"prompts file {path}")
    for part in expected:
        assert part in message, message


def test_missing_file_and_bad_defaults(tmp_path):
    with pytest.raises(PromptsFileError, match=r"prompts file .*nope\.yaml: not found"):
        read_prompts_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(PromptsFileError, match="default width must be a positive integer divisible by 16, got 100"):
        read_prompts_file(_write(tmp_path, "p.yaml", "- a\n"), default_width=100)


def _specs(tmp_path):
    return read_prompts_file(_write(tmp_path, "p.yaml", YAML + "- {prompt: a blue sky, negative_prompt: ' '}\n"),
                             default_width=64, default_height=64)


def test_embeddings_equal_pipeline_encode_prompt(tmp_path, pipe, encoder):
    specs = _specs(tmp_path)
    encoded = encode_prompts(specs, encoder)
    prompts = [s.prompt for s in specs]
    ref, mask = pipe.encode_prompt(prompts, device="cpu")
    lengths = mask.sum(dim=1).tolist()
    assert len(set(lengths)) > 1, "the test needs prompts of different lengths (padding)"
    for i, p in enumerate(encoded.prompts):
        assert p.spec == specs[i]
        assert p.embeds.shape == (lengths[i], TEXT_HIDDEN)
        assert torch.equal(p.embeds, ref[i, : lengths[i]]), f"prompt {i} differs from encode_prompt"
    with_negative = [i for i, s in enumerate(specs) if s.negative_prompt is not None]
    assert with_negative == [1, 3]
    ref_neg, mask_neg = pipe.encode_prompt([specs[i].negative_prompt for i in with_negative], device="cpu")
    for j, i in enumerate(with_negative):
        n = int(mask_neg[j].sum())
        assert torch.equal(encoded.prompts[i].negative_embeds, ref_neg[j, :n])
    assert encoded.prompts[0].negative_embeds is None
    assert encoded.info == {"text_encoder": pipe.text_encoder.config._name_or_path, "hidden_size": TEXT_HIDDEN,
                            "drop_index": 34, "max_length": 1024, "dtype": "float32", "format_version": PROMPTS_VERSION}


def test_save_load_round_trip_is_bit_exact(tmp_path, encoder):
    encoded = encode_prompts(_specs(tmp_path), encoder)
    for dtype in (torch.float32, torch.bfloat16):
        cast = dataclasses.replace(encoded, prompts=[
            dataclasses.replace(p, embeds=p.embeds.to(dtype),
                                negative_embeds=None if p.negative_embeds is None else p.negative_embeds.to(dtype))
            for p in encoded.prompts])
        path = str(tmp_path / "out" / f"prompts-{dtype}.safetensors")
        save_encoded(path, cast)
        back = load_encoded(path)
        assert back.info == encoded.info and back.path == path
        for a, b in zip(cast.prompts, back.prompts):
            assert a.spec == b.spec and a.spec.origin == b.spec.origin
            assert b.embeds.dtype == dtype and torch.equal(a.embeds, b.embeds)
            assert (a.negative_embeds is None) == (b.negative_embeds is None)
            if a.negative_embeds is not None:
                assert torch.equal(a.negative_embeds, b.negative_embeds)
    assert sorted(os.listdir(tmp_path / "out")) == ["prompts-torch.bfloat16.safetensors",
                                                    "prompts-torch.float32.safetensors"]  # no temp files left


def test_load_refuses_other_files(tmp_path):
    def refused(path, *parts):
        with pytest.raises(PromptsFileError) as e:
            load_encoded(str(path))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"encoded prompts {path}")
        for part in parts:
            assert part in str(e.value), str(e.value)

    refused(tmp_path, "not a file")
    refused(tmp_path / "missing.safetensors", "not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    refused(garbage, "not a readable safetensors file")
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(weights), metadata={"format": "pt"})
    refused(weights, "not an encoded-prompts file", "'pt'")
    newer = tmp_path / "newer.safetensors"
    save_file({"prompt.0": torch.zeros(3, 4)}, str(newer), metadata={"format": PROMPTS_FORMAT, "version": "99"})
    refused(newer, "format version '99' is newer", f"({PROMPTS_VERSION})")
    short = tmp_path / "short.safetensors"
    save_file({"prompt.0": torch.zeros(3, 4)}, str(short), metadata={
        "format": PROMPTS_FORMAT, "version": "1", "info": '{"hidden_size": 4}',
        "prompts": '[{"prompt": "a"}, {"prompt": "b"}]'})
    refused(short, "'prompt.1'", "do not match its 2 prompts")


def test_check_encoded_names_both_widths(tmp_path, encoder):
    encoded = encode_prompts(_specs(tmp_path)[:1], encoder)
    check_encoded(encoded, TEXT_HIDDEN)
    with pytest.raises(PromptsFileError, match=f"embeddings are {TEXT_HIDDEN} wide .* joint_attention_dim is 3584"):
        check_encoded(encoded, 3584)


def test_too_long_prompt_is_refused_not_truncated(tmp_path, pipe, encoder):
    words = " ".join(["red blue green"] * 10)  # 30 words, well over 16 tokens
    path = _write(tmp_path, "p.jsonl", f'{{"prompt": "a cat"}}\n{{"prompt": "{words}"}}\n'
                                       f'{{"prompt": "a dog", "negative_prompt": "{words}"}}\n')
    specs = read_prompts_file(path)
    short = QwenTextEncoder(pipe.text_encoder, pipe.tokenizer, max_length=16)
    with pytest.raises(PromptsFileError, match=r"p\.jsonl, line 2: prompt is \d+ tokens, over the text encoder's "
                                               r"limit of 16"):
        encode_prompts(specs, short)
    with pytest.raises(PromptsFileError, match=r"line 3: negative_prompt is \d+ tokens, over .* limit of 16"):
        encode_prompts([specs[0], specs[2]], short)
    # at the real limit (1024): refused where the pipeline (and token_lengths) silently cut at 1024
    long_spec = PromptSpec(" ".join(["red blue green"] * 500))
    assert encoder.token_lengths([long_spec.prompt]) == [1024]
    with pytest.raises(PromptsFileError, match=r"^prompt 0: prompt is \d{4} tokens, over .* limit of 1024"):
        encode_prompts([long_spec], encoder)


def test_cli_encode_and_show(tmp_path, tiny_dir, encoder, capsys):
    prompts = _write(tmp_path, "p.yaml", YAML)
    out = str(tmp_path / "run" / "validation_prompts.safetensors")
    assert main(["encode", prompts, "--encoders", tiny_dir, "--out", out, "--device", "cpu", "--dtype", "fp32",
                 "--width", "64", "--height", "48"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].endswith(f"-> {out}")
    assert "64x48  seed 0" in lines[0] and "64x48  seed 7" in lines[1] and "negative" in lines[1]
    loaded = load_encoded(out)
    expected = encode_prompts(read_prompts_file(prompts, default_width=64, default_height=48), encoder)
    assert [p.spec for p in loaded.prompts] == [p.spec for p in expected.prompts]
    for a, b in zip(loaded.prompts, expected.prompts):
        assert torch.equal(a.embeds, b.embeds)
    assert main(["show", out]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"{out}: 3 prompts, {TEXT_HIDDEN} wide, float32") and shown[1:] == lines[:3]


def test_cli_errors_exit_2_with_one_line(tmp_path, tiny_dir, capsys):
    bad = _write(tmp_path, "bad.yaml", "- {prompt: a, width: 100}\n")
    out = str(tmp_path / "out.safetensors")
    assert main(["encode", bad, "--encoders", tiny_dir, "--out", out, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompts file") and "field 'width'" in err and err.count("\n") == 1
    good = _write(tmp_path, "good.yaml", "- a\n")
    assert main(["encode", good, "--encoders", str(tmp_path), "--out", out, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Qwen2.5-VL text encoder in") and err.count("\n") == 1
    assert not os.path.exists(out)
    # the module runs as a program: `python -m megatron_qwen_image.prompts`
    run = subprocess.run([sys.executable, "-m", "megatron_qwen_image.prompts", "show", str(tmp_path / "none")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and run.stderr.startswith("error: encoded prompts") and "not found" in run.stderr
