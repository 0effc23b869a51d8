import torch

from sla_dsl.launch_tables import chunk_table, log_gammas, scalar
from sla_dsl.loader import load_spec


def _as_lists(table):
    return (table.cu_seqlens.tolist(), table.chunk_offsets.tolist(), table.chunk_indices.tolist(),
            table.num_sequences, table.num_chunks)


def test_equal_lengths_match_the_packed_tables_of_the_same_lengths():
    for batch, length, chunk in ((3, 50, 16), (2, 64, 64), (1, 1, 16), (4, 17, 32)):
        cu = torch.arange(batch + 1) * length
        assert _as_lists(chunk_table(batch, length, None, chunk, torch.device("cpu"))) == \
            _as_lists(chunk_table(1, batch * length, cu, chunk, torch.device("cpu")))


def test_packed_tables_list_every_chunk_of_every_sequence():
    table = chunk_table(1, 45, torch.tensor([0, 5, 5, 45]), 16, torch.device("cpu"))
    assert table.num_chunks == 1 + 0 + 3
    assert table.chunk_offsets.tolist() == [0, 1, 1, 4]
    assert table.chunk_indices.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2]]


def test_equal_length_tables_and_constants_are_built_once():
    cpu = torch.device("cpu")
    assert chunk_table(2, 100, None, 16, cpu) is chunk_table(2, 100, None, 16, cpu)
    rec = load_spec("specs/retnet.yaml").recurrence
    assert log_gammas(rec, 4, cpu) is log_gammas(rec, 4, cpu)
    assert torch.allclose(log_gammas(rec, 4, cpu).double(), torch.tensor(rec.log_gammas(4), dtype=torch.float64))
    assert scalar(0.5, cpu).tolist() == [0.5]
