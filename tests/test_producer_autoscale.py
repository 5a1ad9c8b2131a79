"""The producer's autoscaling rule, state by state (no Ray, no clock): which pool grows, which actors retire.

A real run reaches these states only as fast as its actors go, so the end-to-end runs in
test_producer_ray.py assert only what holds at any speed; the decisions themselves are checked here.
"""
import random

from producer.autoscale import OpenShard, PoolState, ScalePlan, plan_scaling
from producer.config import PoolSize

LIMIT = 2  # pools.max_chunks_in_flight


def pool(ready, lo, hi, starting=0, restarting=0):
    return PoolState(tuple(ready), starting, restarting, PoolSize(lo, hi))


def test_cpu_bound_grows_the_cpu_pool_by_one():
    """Shards queued, the only CPU actor busy, its encoder without a chunk: the CPU side is the bottleneck."""
    shards = [OpenShard("c1", "e1", 0, False)]
    plan = plan_scaling(2, shards, pool(["c1"], 1, 3), pool(["e1"], 1, 1), LIMIT)
    assert plan == ScalePlan(grow_cpu=True)
    assert plan.reasons == ("autoscale: cpu pool 1 -> 2 (2 shards queued, 1 encoders idle)",)


def test_no_cpu_growth_when_the_encoder_has_work_or_a_cpu_actor_is_free_or_starting_or_at_max():
    busy = [OpenShard("c1", "e1", 0, False)]
    fed = [OpenShard("c1", "e1", 1, False)]
    cpu, enc = pool(["c1"], 1, 3), pool(["e1"], 1, 1)
    assert plan_scaling(2, fed, cpu, enc, LIMIT) == ScalePlan()  # the encoder is busy: not CPU-bound
    assert plan_scaling(2, busy, pool(["c1", "c2"], 1, 3), enc, LIMIT) == ScalePlan()  # c2 takes the next shard
    assert plan_scaling(2, busy, pool(["c1"], 1, 3, starting=1), enc, LIMIT) == ScalePlan()  # one at a time
    assert plan_scaling(2, busy, pool(["c1"], 1, 1), enc, LIMIT) == ScalePlan()  # at max
    assert plan_scaling(2, busy, pool(["c1"], 1, 2, restarting=1), enc, LIMIT) == ScalePlan()  # max counts it
    assert plan_scaling(0, busy, cpu, enc, LIMIT) == ScalePlan()  # nothing queued
    assert plan_scaling(2, busy, cpu, pool([], 1, 1, starting=1), LIMIT) == ScalePlan()  # no encoder ready yet


def test_encoder_bound_grows_the_encoder_pool_when_there_is_work_to_spread():
    full = [OpenShard("c1", "e1", LIMIT, False), OpenShard("c2", "e1", 0, True)]  # done counts as saturated
    cpu = pool(["c1", "c2"], 2, 2)
    plan = plan_scaling(0, full, cpu, pool(["e1"], 1, 2), LIMIT)
    assert plan.grow_encoder and not plan.grow_cpu
    assert plan.reasons == ("autoscale: encoder pool 1 -> 2 (every open shard is waiting on its encoder)",)
    one = [OpenShard("c1", "e1", LIMIT, False)]
    assert plan_scaling(3, one, pool(["c1"], 1, 1), pool(["e1"], 1, 2), LIMIT).grow_encoder  # shards queued
    assert not plan_scaling(0, one, pool(["c1"], 1, 1), pool(["e1"], 1, 2), LIMIT).grow_encoder  # nothing to spread
    not_full = [OpenShard("c1", "e1", LIMIT - 1, False), OpenShard("c2", "e1", LIMIT, False)]
    assert not plan_scaling(0, not_full, cpu, pool(["e1"], 1, 2), LIMIT).grow_encoder
    assert not plan_scaling(0, full, cpu, pool(["e1"], 1, 2, starting=1), LIMIT).grow_encoder
    assert not plan_scaling(0, [], cpu, pool(["e1"], 1, 2), LIMIT).grow_encoder  # no open shard


def test_idle_actors_above_min_retire_once_the_queue_is_empty():
    shards = [OpenShard("c2", "e2", 1, False)]
    cpu, enc = pool(["c1", "c2", "c3"], 1, 4), pool(["e1", "e2", "e3"], 2, 3)
    plan = plan_scaling(0, shards, cpu, enc, LIMIT)
    assert plan.retire_cpu == ("c1", "c3") and plan.retire_encoder == ("e1",)  # never an actor holding a shard
    assert plan.reasons.count("autoscale: retiring an idle cpu actor") == 2
    assert plan_scaling(0, shards, pool(["c1", "c2", "c3"], 2, 4), enc, LIMIT).retire_cpu == ("c1",)
    assert plan_scaling(1, shards, cpu, enc, LIMIT) == ScalePlan()  # work is waiting: keep everyone


def _random_state(rng):
    cpu_ids = [f"c{i}" for i in range(rng.randint(0, 4))]
    enc_ids = [f"e{i}" for i in range(rng.randint(0, 3))]
    shards = [OpenShard(c, rng.choice(enc_ids), rng.randint(0, LIMIT), rng.random() < 0.3)
              for c in cpu_ids if enc_ids and rng.random() < 0.6]
    lo_c, lo_e = rng.randint(1, 3), rng.randint(1, 2)
    cpu = pool(cpu_ids, lo_c, lo_c + rng.randint(0, 3), rng.randint(0, 1), rng.randint(0, 1))
    enc = pool(enc_ids, lo_e, lo_e + rng.randint(0, 2), rng.randint(0, 1), rng.randint(0, 1))
    return rng.randint(0, 3), shards, cpu, enc


def test_invariants_in_any_state():
    """Never above max, never below min (so a fixed pool at its size never changes), never an actor that holds a
    shard, and one log line per action."""
    rng = random.Random(0)
    for _ in range(3000):
        queued, shards, cpu, enc = _random_state(rng)
        plan = plan_scaling(queued, shards, cpu, enc, LIMIT)
        for grow, retire, p in ((plan.grow_cpu, plan.retire_cpu, cpu), (plan.grow_encoder, plan.retire_encoder, enc)):
            assert not (grow and retire)
            assert p.total + grow <= max(p.total, p.size.max)
            assert len(p.ready) - len(retire) >= min(len(p.ready), p.size.min)
            assert set(retire) <= set(p.ready)
        held = {s.cpu for s in shards} | {s.encoder for s in shards}
        assert not held & (set(plan.retire_cpu) | set(plan.retire_encoder))
        assert len(plan.reasons) == plan.grow_cpu + plan.grow_encoder + len(plan.retire_cpu) + len(plan.retire_encoder)

