from jobs import protocol as p


def test_id_validation() -> None:
    assert p.is_valid_id("a" * 32)
    assert not p.is_valid_id("A" * 32)
