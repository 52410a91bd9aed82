import pytest


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory):
    """The resumable run (tests/helpers/titan_runs.RESUMABLE) at dp_shard 2: (its dump folder, step ->
    loss); the resume tests' reference and the EP tests' EP 1. Tests copy from its folder, never into it."""
    from tests.helpers.titan_runs import RESUMABLE
    from titan_dsv4.launch import losses, run_train

    dump = tmp_path_factory.mktemp("fsdp_run")
    rc, log = run_train([*RESUMABLE, "--job.dump_folder", str(dump)])
    assert rc == 0, log[-4000:]
    return dump, losses(log)
