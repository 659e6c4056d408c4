"""tools/make_examples.py and tools/plot_log.py: the files README's examples use, the plot."""
import json
import zipfile

import pytest
from PIL import Image

import make_examples
import plot_log
from conftest import make_teacher_and_jsonl
from scale.weights import load_model_folder


def test_make_examples_writes_the_images_and_a_tinyvision_student(tmp_path, capsys):
    teacher_dir, teacher, _ = make_teacher_and_jsonl(tmp_path)
    (teacher_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    wheel = tmp_path / "scikit_image-0-py3-none-any.whl"
    Image.new("RGB", (451, 300), (10, 20, 30)).save(tmp_path / "c.png")
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "c.png", "skimage/data/chelsea.png")
    out = tmp_path / "examples"
    make_examples.main([f"--out_dir={out}", f"--skimage_wheel={wheel}",
                        f"--tinyvision={teacher_dir}"])
    assert Image.open(out / "colour.png").size == (32, 32)
    assert Image.open(out / "chelsea.png").size == (451, 300)
    vlm = load_model_folder(str(out / "smollm2-135m-tinyvision"))
    assert vlm.n_image_tokens == 16 and vlm.image_splitting.max_side == 192
    assert vlm.decoder.cfg.dim == teacher.cfg.dim and len(vlm.view_token_ids) == 65
    cfg = json.loads((out / "smollm2-135m-tinyvision" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "{{ x }}"                    # the LM's chat template came along
    assert "white square" in capsys.readouterr().out


def test_make_examples_bad_flags_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--skimage_wheel=nowhere.whl: no such file"):
        make_examples.main([f"--out_dir={tmp_path}", "--skimage_wheel=nowhere.whl"])
    with pytest.raises(SystemExit, match="--tinyvision=.*expected a Hugging Face LM folder"):
        make_examples.main([f"--out_dir={tmp_path}", f"--tinyvision={tmp_path}"])


def test_plot_log_reads_every_stage_and_names_a_bad_line(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_log.py needs matplotlib (requirements-dev)")
    log = tmp_path / "log.jsonl"
    records = [{"stage": s, "step": k, "time": 0.5 * k, "loss": 2.0 / k, "ce": 1.5 / k,
                **({"kd": 0.5 / k} if s == "distill" else {})}
               for s in ("pretrain", "distill") for k in (1, 2, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    stages = plot_log.read_log(str(log))
    assert list(stages) == ["pretrain", "distill"] and stages["distill"]["wall_s"] == 1.5
    plot_log.main([str(log)])
    assert Image.open(tmp_path / "log.png").size[0] > 0
    log.write_text("{not json\n")
    with pytest.raises(SystemExit, match="log.jsonl line 1: not a train.py log record"):
        plot_log.main([str(log)])
