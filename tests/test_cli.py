"""The `fastse` command line."""

from click.testing import CliRunner
from fastse.cli.main import main


def test_data_check_on_real_cifar(cifar10_dir):
    result = CliRunner().invoke(main, ["data", "check", str(cifar10_dir)])
    assert result.exit_code == 0, result.output
    assert "train: 50000 images in 10 classes" in result.output
    assert "test: 10000 images in 10 classes" in result.output


def test_data_check_refuses_a_missing_folder_with_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "nope" in result.output


def test_data_check_names_a_corrupt_file(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / cls / "0.jpg")
    (tmp_path / "b" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path)])
    assert result.exit_code == 2
    assert "1.jpg" in result.output
