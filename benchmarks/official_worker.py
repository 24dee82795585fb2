"""The official PyTorch CUD code's train steps, timed one at a time for benchmarks/official_speed.py.

    <python with torch> benchmarks/official_worker.py REFERENCE_CODE NETWORK_JSON BATCH

REFERENCE_CODE: a checkout of the authors' repository (github.com/shaoshitong/Catch-Up-Distillation), whose
modules `network_edm`, `flows`, `models`, `EMA` and `utils` are imported from there, unchanged. NETWORK_JSON: the
keyword arguments of its `network_edm.SongUNet`. This script imports no TensorFlow: it runs in its own process, so
that the two frameworks never share a thread pool, and the benchmark asks it for one step at a time, so that its
steps and cud-tf's alternate on the machine.

Protocol: one JSON object per line. At start it prints {"torch", "threads", "params", "encoder_params"}. Then for
each line `{"step": METHOD}` on stdin it runs one train step of METHOD and prints {"value"} (the loss; for "forward"
the samples' mean); METHOD is "rf" (rectified flow, the noise drawn independently), "rf+enc" (with the noise
encoder) or "cudK+enc" (CUD of order K = 1, 2, 3 with the encoder), or "forward" (one-step sampling of the batch:
eval mode, no gradients, the scripts' `sample_ode_generative(z1, N=1)`). A step is what the authors' training
scripts do per iteration on one device, with their default loss weights and the prior weight 20: zero the gradients,
the losses, backward, Adam, the EMA updates (decay 0.9999); on the CPU instead of CUDA, without DDP and without
`torch.compile` (inductor needs a C++ toolchain and compiles per shape).
"""
import json
import os
import sys


def main(reference_code, network_json, batch):
    protocol = sys.stdout
    sys.stdout = sys.stderr  # the official modules print (e.g. "phi is 0.25"): keep stdout for the protocol
    sys.path.insert(0, os.path.abspath(reference_code))
    import torch

    import EMA
    import flows
    import models
    import network_edm
    import utils

    torch.manual_seed(0)
    kwargs = json.loads(network_json)
    batch = int(batch)
    device = torch.device("cpu")
    flow = network_edm.SongUNet(**kwargs).to(device)
    encoder = models.UNetEncoder(encoder=network_edm.SongUNet(**dict(kwargs, out_channels=2 * kwargs["in_channels"])),
                                 input_nc=kwargs["in_channels"]).to(device)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), params=count(flow),
                          encoder_params=count(encoder))), file=protocol, flush=True)
    shape = (batch, kwargs["in_channels"], kwargs["img_resolution"], kwargs["img_resolution"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1  # a fixed batch in [-1, 1]
    ones = torch.ones(batch, device=device)
    steps = {}

    def build(method):
        if method == "forward":  # one-step sampling, as the training scripts sample: eval mode, no gradients
            sampler, z = flows.RectifiedFlow(device, flow, num_steps=1), torch.randn(shape)

            def sample():
                flow.eval()
                with torch.no_grad():
                    _, x0 = sampler.sample_ode_generative(z1=z, N=1, use_tqdm=False)
                flow.train()
                return float(x0[-1].mean())
            return sample
        enc = method.endswith("+enc")
        base = method[:-4] if enc else method
        if base == "rf":  # train_reverse_img_ddp.py (with --independent when no encoder): EMA through the optimizer
            rf = flows.RectifiedFlow(device, flow, num_steps=16)
            params = list(encoder.parameters()) + list(flow.parameters()) if enc else list(flow.parameters())
            opt = EMA.EMA(torch.optim.Adam(params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8), ema_decay=0.9999)
            opt.ema_start()  # the script starts it after its first step
            emas = []

            def losses():
                if enc:
                    z, mu, logvar = encoder(x, ones)
                    prior = 20.0 * utils.get_kl(mu, logvar)
                else:
                    z, prior = torch.randn_like(x), 0.0
                z_t, t, target = rf.get_train_tuple(z0=x, z1=z)
                return torch.mean((target - rf.model(z_t, t.squeeze())) ** 2) + prior
        elif base.startswith("cud") and base[3:] in ("1", "2", "3") and enc:
            # K = 1: train_online_slim_reverse_img_ddp.py; K = 2, 3: its _nightly variant, which adds the K - 1
            # meta generators (network_edm.MetaGenerator on the network's features), each with its own EMA.
            order = int(base[3:])
            generators = [network_edm.MetaGenerator(in_channel=flow.meta_in_channel,
                                                    out_channel=flow.meta_out_channel) for _ in range(order - 1)]
            # Keywords: the scripts pass (device, ema_model, flow_model) positionally into (device, model, ema_model).
            rf = flows.OnlineSlimFlow(device, model=flow, ema_model=EMA.EMAMODEL(model=flow),
                                      generator_list=generators or None, num_steps=16)
            emas = [(EMA.EMAMODEL(model=g), g) for g in generators]
            params = list(encoder.parameters()) + list(flow.parameters())
            opt = torch.optim.Adam(params + [p for g in generators for p in g.parameters()], lr=3e-4,
                                   betas=(0.9, 0.999), eps=1e-8)
            emas.append((rf.ema_model, rf.model))
            mse = torch.nn.functional.mse_loss

            def losses():
                z, mu, logvar = encoder(x, ones)
                prior = 20.0 * utils.get_kl(mu, logvar)
                if order == 1:  # the script's default l_weight [0, 1]: the MSE to z1 - z0 alone
                    pred_z_t, _, gt_z_t = rf.get_train_tuple(z0=x, z1=z, pred_step=1)
                    return mse(pred_z_t, gt_z_t) + prior
                preds, emas_z_t, gt_z_t = rf.get_train_tuple(z0=x, z1=z, pred_step=order)
                # The nightly script's default l_weight [2, 2]: each head to its catch-up target, g_1 to z1 - z0.
                catch_up = sum(0.5 * 2.0 * mse(p, e) for p, e in zip(preds, emas_z_t))
                return catch_up + 0.5 * 2.0 * mse(preds[0], gt_z_t) + prior
        else:
            raise ValueError(f"unknown method {method!r}: rf, rf+enc or cudK+enc (K = 1, 2, 3)")

        def step():
            opt.zero_grad()
            loss = losses()
            loss.backward()
            opt.step()
            for ema, model in emas:
                ema.ema_step(decay_rate=0.9999, model=model)
            return float(loss.detach())
        return step

    flow.train()
    encoder.train()
    for line in sys.stdin:
        method = json.loads(line)["step"]
        if method not in steps:
            steps[method] = build(method)
        print(json.dumps(dict(value=steps[method]())), file=protocol, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: official_worker.py REFERENCE_CODE NETWORK_JSON BATCH")
    main(*sys.argv[1:])
