"""`saev_store.distributed.agree` in two gloo processes: process 0's decision (value or error) reaches
both; an error in either process stops both with the same message; a bug keeps its own traceback where it
happened and is named elsewhere."""

import torch.distributed as dist
import torch.multiprocessing as mp

from saev_store.distributed import PeerError, agree
from saev_store.errors import UserError


def _outcome(fn, **kw):
    try:
        return ("ok", agree(fn, **kw))
    except PeerError as e:
        return ("peer", str(e))
    except UserError as e:
        return ("user", str(e))
    except ZeroDivisionError:
        return ("bug", None)


def _worker(rank, init_fpath, q):
    dist.init_process_group("gloo", init_method=f"file://{init_fpath}", rank=rank, world_size=2)
    try:
        ran = []

        def decide():
            ran.append(rank)
            return {"made_by": rank}

        def fails_on(r, exc):
            def fn():
                if rank == r:
                    raise exc
                return rank
            return fn

        q.put((rank, [
            _outcome(decide, rank0_only=True) + (tuple(ran),),
            _outcome(fails_on(1, UserError("image 7 is unreadable"))),
            _outcome(fails_on(0, UserError("the folder exists")), rank0_only=True),
            _outcome(fails_on(1, ZeroDivisionError("x"))),
            _outcome(lambda: rank * 10),
        ]))
    finally:
        dist.destroy_process_group()


def test_two_processes_agree(tmp_path):
    ctx = mp.get_context("fork")  # the workers need nothing this process has not imported
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "pg"), q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        decided, late_error, refused, bug, own = got[rank]
        assert decided == ("ok", {"made_by": 0}, (0,) if rank == 0 else ())  # only process 0 ran it
        assert late_error == ("user", "image 7 is unreadable")
        assert refused == ("user", "the folder exists")
        assert own == ("ok", rank * 10)
    assert got[1][3] == ("bug", None)
    assert got[0][3][0] == "peer" and "process 1 of 2 failed (ZeroDivisionError: x)" in got[0][3][1]
