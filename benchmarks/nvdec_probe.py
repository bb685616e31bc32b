"""What this machine's PyNvVideoCodec offers, step by step: each step independent, one line each.

Run by benchmarks/gpu_check.sh before the tests, so that a failing NVDEC test comes with the facts needed
to understand it (API attributes, DLPack layout, packet feeding from PyAV).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

R: dict[str, object] = {}


def step(name):
    def deco(fn):
        t = time.time()
        try:
            R[name] = fn()
        except Exception as exc:
            R[name] = {"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-600:]}
        print(f"[probe] {name} ({time.time() - t:.2f}s): {json.dumps(R[name], default=str)[:900]}", flush=True)
        return fn

    return deco


def main() -> None:
    import av
    import numpy as np
    import torch

    path = os.path.join(tempfile.mkdtemp(), "probe.mp4")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
        s.options = {"g": "25", "bf": "3"}
        for i in range(50):
            img = np.full((360 * 3 // 2, 640), 128, np.uint8)
            img[:360] = (np.arange(640)[None, :] + i * 3) % 220 + 16
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="yuv420p")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)

    import PyNvVideoCodec as nvc  # noqa: N813

    @step("module")
    def _m():
        return {"version": getattr(nvc, "__version__", "?"), "names": sorted(n for n in dir(nvc) if not n.startswith("_"))[:80]}

    @step("packetdata")
    def _p():
        pd = nvc.PacketData()
        out = {"attrs": [a for a in dir(pd) if not a.startswith("_")]}
        for a, v in (("bsl_data", 0), ("bsl", 0), ("pts", 5), ("key", 1)):
            try:
                setattr(pd, a, v)
                out[f"set_{a}"] = "ok"
            except Exception as exc:
                out[f"set_{a}"] = repr(exc)
        return out

    @step("native_demux_decode")
    def _n():
        dmx = nvc.CreateDemuxer(filename=path)
        dec = nvc.CreateDecoder(gpuid=0, codec=dmx.GetNvCodecId(), cudacontext=0, cudastream=0, usedevicememory=True)
        frames = []
        for pkt in dmx:
            frames.extend(dec.Decode(pkt))
        f = frames[0]
        t = torch.from_dlpack(f)
        return {"frames": len(frames), "frame_attrs": [a for a in dir(f) if not a.startswith("_")],
                "shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype), "device": str(t.device),
                "pts": [getattr(x, "getPTS", lambda: None)() for x in frames[:5]]}

    @step("pyav_packets_to_nvdec")
    def _pa():
        from engine.decode.nvdec import NvdecVideoDecoder

        with av.open(path) as c:
            vs = c.streams.video[0]
            d = NvdecVideoDecoder(vs, 0, "cuda:0")
            out = []
            for p in c.demux(vs):
                out.extend(d.decode(p) if p.size else d.flush())
        return {"frames": len(out), "errors": d.errors, "first_ts": [o[0] for o in out[:4]],
                "size": [out[0][1].height, out[0][1].width] if out else None}

    @step("threaded_decoder")
    def _t():
        from engine.decode.nvdec import drain_count

        td = nvc.ThreadedDecoder(path, buffer_size=8, gpu_id=0, use_device_memory=True)
        meta = td.get_stream_metadata()
        n = drain_count(td, 8)
        return {"frames": n, "meta": {a: str(getattr(meta, a)) for a in dir(meta) if not a.startswith("_")}}

    @step("memory_per_session")
    def _mem():
        """GPU memory one more session costs, by kind and settings (NVML, 1080p clip when given)."""
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        clip = os.environ.get("PROBE_CLIP") or path
        out = {"clip": clip}

        def used() -> int:
            torch.cuda.synchronize()
            return pynvml.nvmlDeviceGetMemoryInfo(h).used

        for name, make in (
            ("threaded_b16_c4", lambda: nvc.ThreadedDecoder(clip, buffer_size=16, gpu_id=0, use_device_memory=True)),
            ("threaded_b8_c1", lambda: nvc.ThreadedDecoder(clip, buffer_size=8, gpu_id=0, use_device_memory=True,
                                                          decoder_cache_size=1)),
            ("threaded_b4_c1", lambda: nvc.ThreadedDecoder(clip, buffer_size=4, gpu_id=0, use_device_memory=True,
                                                          decoder_cache_size=1)),
        ):
            base = used()
            tds = [make() for _ in range(6)]
            for td in tds:
                td.get_batch_frames(4)
            time.sleep(0.3)
            out[name] = round((used() - base) / 6 / 2**20, 1)
            for td in tds:
                td.end()
            del tds
        from engine.decode.nvdec import NvdecVideoDecoder

        base = used()
        keep = []
        for _ in range(6):
            c = av.open(clip)
            d = NvdecVideoDecoder(c.streams.video[0], 0, "cuda:0")
            for i, p in enumerate(c.demux(c.streams.video[0])):
                if p.size:
                    d.decode(p)
                if i > 10:
                    break
            keep.append((c, d))
        out["packet_session"] = round((used() - base) / 6 / 2**20, 1)
        return out

    json.dump(R, open(os.path.join(os.environ.get("OUT", "/tmp"), "nvdec_probe.json"), "w"), indent=1, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
