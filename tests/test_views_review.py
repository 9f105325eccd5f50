"""Review checks of what users read: error lines of the file readers (formats)."""

import pytest

from vaerepro.formats import DataError, read_idx


def test_an_idx_path_that_is_a_directory_is_not_called_a_corrupt_gzip_file(tmp_path):
    # the file cannot be read at all: saying its gzip is corrupt sends the user after the wrong problem
    folder = tmp_path / "train-images-idx3-ubyte.gz"
    folder.mkdir()
    with pytest.raises(DataError) as err:
        read_idx(folder)
    assert str(err.value).startswith(f"{folder}: cannot read the file (")
    assert "gzip" not in str(err.value)
