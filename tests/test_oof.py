import numpy as np
import pyarrow.parquet as pq
import pytest

from steel_ray import data, oof


@pytest.fixture()
def run(tiny_set, tmp_path):
    ts = data.load_train(tiny_set)
    folds = data.make_folds(ts.presence, 3, 0)
    oof.write_truth(tmp_path, ts, folds, data.folds_hash(ts.image_ids, folds))
    return tmp_path, ts, folds


def _fake(ts, folds, k, seed):
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(folds == k)
    probs = rng.random((idx.size, 4, *ts.shape)).astype(np.float32)
    return [ts.image_ids[i] for i in idx], probs, rng.random((idx.size, 4)).astype(np.float32)


def test_write_read_equals_quantised(run):
    path, ts, folds = run
    h = data.folds_hash(ts.image_ids, folds)
    for k in range(3):
        ids, probs, cls = _fake(ts, folds, k, k)
        oof.write_oof(path, "m1", k, ids, oof.quantize(probs), cls, *ts.shape, h)
    pool = oof.read_pool(path, ["m1"])
    assert pool.image_ids == ts.image_ids and pool.probs.shape == (1, 48, 4, 64, 256)
    for k in range(3):
        ids, probs, cls = _fake(ts, folds, k, k)
        rows = [pool.image_ids.index(i) for i in ids]
        np.testing.assert_array_equal(pool.probs[0, rows], np.rint(probs * 255).astype(np.uint8))
        np.testing.assert_array_equal(pool.cls[0, rows], cls)
    # filters: classes, folds, 4x resolution
    sub = oof.read_pool(path, ["m1"], folds=[1], classes=[2], resolution="ds4")
    assert sub.probs.shape == (1, int((folds == 1).sum()), 1, 16, 64)
    ids, probs, _ = _fake(ts, folds, 1, 1)
    q = oof.quantize(probs)[:, 2]
    np.testing.assert_array_equal(sub.probs[0, :, 0], oof.downsample(q))
    # area downsampling: a 4x4 block mean
    assert abs(int(sub.probs[0, 0, 0, 0, 0]) - q[0, :4, :4].mean()) <= 0.5 + 1e-9


def test_schema_and_metadata(run):
    path, ts, folds = run
    ids, probs, cls = _fake(ts, folds, 0, 0)
    p = oof.write_oof(path, "m1", 0, ids, oof.quantize(probs), cls, *ts.shape, "abc", {"lr": 0.1})
    assert p == path / "oof" / "model_id=m1" / "fold=0" / "part-0.parquet"
    f = pq.ParquetFile(p)
    assert f.schema_arrow.names == ["image_id", "p1", "p2", "p3", "p4", "p1_ds4", "p2_ds4", "p3_ds4", "p4_ds4", "cls"]
    rg = f.metadata.row_group(0)
    assert rg.column(1).compression == "ZSTD" and rg.column(1).statistics is None
    assert "PLAIN_DICTIONARY" not in rg.column(1).encodings and "RLE_DICTIONARY" not in rg.column(1).encodings
    meta = oof.read_meta(p)
    assert meta["height"] == 64 and meta["width"] == 256 and meta["folds_hash"] == "abc" and meta["config"] == {"lr": 0.1}
    assert "255" in meta["quantisation"] and meta["version"]


def test_interrupted_write_leaves_nothing_readable(run):
    path, ts, folds = run
    ids, probs, cls = _fake(ts, folds, 0, 0)
    with pytest.raises(RuntimeError, match="killed"):
        with oof.OOFWriter(path, "m1", 0, *ts.shape, "abc", row_group=4) as w:
            w.add(ids[:8], oof.quantize(probs[:8]), cls[:8])  # two row groups already on disk
            raise RuntimeError("killed")
    folder = path / "oof" / "model_id=m1" / "fold=0"
    assert not list(folder.glob("*.parquet")) and not list(folder.iterdir())
    assert oof.list_pool(path) == {}


def test_missing_fold_is_named(run):
    path, ts, folds = run
    h = data.folds_hash(ts.image_ids, folds)
    for m, ks in (("m1", [0, 1, 2]), ("m2", [0, 2])):
        for k in ks:
            ids, probs, cls = _fake(ts, folds, k, k)
            oof.write_oof(path, m, k, ids, oof.quantize(probs), cls, *ts.shape, h)
    with pytest.raises(oof.PoolGapError, match=r"missing \(model, fold\): \(m2, 1\)") as e:
        oof.read_pool(path)
    assert e.value.gaps == [("m2", 1)]
    assert oof.read_pool(path, ["m2"], folds=[0, 2]).probs.shape[1] == int((folds != 1).sum())


def test_fold_files_in_another_order_are_refused_naming_the_file(tmp_path):
    """The one OOF reader reads a fold's files in lockstep: a file listing the images in another
    order (a second writer, an edited file) is named, not silently mis-aligned."""
    from blend_pools import make_truth, signal_model, write_run

    rng = np.random.default_rng(0)
    masks = make_truth(rng, n=30, shape=(32, 64))
    write_run(tmp_path, masks, {"a": signal_model(rng, masks), "b": signal_model(rng, masks)})
    truth = oof.read_truth(tmp_path)
    rows = [r for r, _, _ in oof.iter_fold_batches(tmp_path, ["a", "b"], truth, 1, ["image_id", "cls"])]
    assert sorted(np.concatenate(rows).tolist()) == np.flatnonzero(truth.folds == 1).tolist()
    path = oof.oof_path(tmp_path, "b", 1)
    t = pq.read_table(path)
    pq.write_table(t.take(np.arange(t.num_rows)[::-1]).replace_schema_metadata(t.schema.metadata), path)
    with pytest.raises(data.DataError, match=r"model_id=b/fold=1/part-0.parquet: lists the images of fold 1 in another order"):
        list(oof.iter_fold_batches(tmp_path, ["a", "b"], truth, 1, ["image_id", "cls"]))


def test_maps_read_from_arrow_buffers_of_a_sliced_batch(run):
    """oof.maps reads the blobs from the Arrow buffers: a batch that starts mid-buffer (offset)
    gives the same maps as decoding each blob, into a view or into a given array."""
    path, ts, folds = run
    ids, probs, cls = _fake(ts, folds, 0, 0)
    f = oof.write_oof(path, "m1", 0, ids, oof.quantize(probs), cls, *ts.shape, data.folds_hash(ts.image_ids, folds))
    batch = pq.read_table(f).to_batches()[0].slice(3, 5)
    assert batch.column("p2").offset == 3
    want = np.stack([np.frombuffer(b, np.uint8).reshape(ts.shape) for b in batch.column("p2").to_pylist()])
    np.testing.assert_array_equal(oof.maps(batch, "p2", ts.shape, f), want)
    out = np.zeros((5, *ts.shape), np.uint8)
    assert oof.maps(batch, "p2", ts.shape, f, out=out) is out
    np.testing.assert_array_equal(out, oof.quantize(probs)[3:8, 1])


def test_a_pool_of_an_older_model_id_scheme_is_refused_naming_the_file(run):
    """A file written before id scheme 2 (no steel_ray.id_scheme in its metadata) is refused in one
    line: its directory's model id no longer matches its config."""

    from steel_ray.config import ID_SCHEME

    path, ts, folds = run
    h = data.folds_hash(ts.image_ids, folds)
    ids, probs, cls = _fake(ts, folds, 0, 0)
    f = oof.write_oof(path, "m1", 0, ids, oof.quantize(probs), cls, *ts.shape, h)
    truth = oof.read_truth(path)
    assert oof.read_meta(f)["id_scheme"] == ID_SCHEME and oof.check_fold_file(f, truth, 0) == ids
    t = pq.read_table(f)
    old = {k: v for k, v in t.schema.metadata.items() if k != b"steel_ray.id_scheme"}
    pq.write_table(t.replace_schema_metadata(old), f)
    with pytest.raises(data.DataError, match=f"{f}: written by steel_ray .* model ids of scheme 1; .*new folder"):
        oof.check_fold_file(f, truth, 0)
    assert oof.read_meta(f)["model_id"] == "m1"  # the rest of the metadata is untouched


def test_finished_is_the_one_fold_done_answer():
    """train (a local fold), a trial (the pool) and the search driver (pending folds) ask oof.finished:
    no OOF file is not done; one of this split is reused; one of another split is refused, named."""
    import pytest

    from steel_ray.data import DataError

    meta = {"folds_hash": "abc", "epochs_run": 3}
    assert oof.finished(None, "abc", "x") is None
    assert oof.finished(meta, "abc", "x") is meta and oof.finished(meta, None, "x") is meta
    with pytest.raises(DataError, match=r"^s3://b/pool: m fold 1: OOF of another fold split \(folds_hash abc != def\)"):
        oof.finished(meta, "def", "s3://b/pool: m fold 1")
