import torch
from sae_lens import SAE
from safetensors.torch import save_file

from sae_training.cli import main


def test_sae_train_cli_trains_on_two_files(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file(
            {"activations": torch.randn(1500, 8, generator=g)},
            str(tmp_path / name / "blocks.0.hook_resid_post.safetensors"),
        )
    out = tmp_path / "sae"
    rc = main(
        [
            "--activations",
            str(tmp_path / "a/blocks.0.hook_resid_post.safetensors"),
            "--activations",
            str(tmp_path / "b/blocks.0.hook_resid_post.safetensors"),
            "--width",
            "2x",
            "--batch-size",
            "256",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and "explained variance" in capsys.readouterr().out
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.d_sae == 16 and sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert main(["--activations", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2


def test_sae_train_cli_names_bad_settings_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "blocks.0.hook_resid_post.safetensors"
    save_file({"activations": torch.randn(300, 8)}, str(path))
    out = tmp_path / "sae"
    base = ["--activations", str(path), "--out", str(out), "--epochs", "1"]
    cases = [
        (["--trainer", "fused", "--arch", "topk"], "trainer 'fused'"),
        (["--width", "wide"], "--width 'wide'"),
        (["--batch-size", "1024"], "--batch-size for sae-train"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("sae-train: error:") and message in err, err
        assert "Traceback" not in err
    assert not out.exists()  # nothing half-written
