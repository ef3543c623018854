"""What the logging rank says (train.py's Progress): the run once, then a line per optimizer step, the same numbers
going to --metrics_file and W&B. Moved out of train.py in step 15, which adds the mixture of experts' numbers."""
import torch

from metrics import (MetricsLogger, flops_per_token, measure_matmul_flops, peak_flops_per_device, peak_memory_gb,
                     to_readable_format)


class Progress:
    """What the logging rank says: the run once, then a line per optimizer step with its loss, gradient norm,
    learning rate, tokens/s, MFU and memory, the same numbers going to --metrics_file and W&B."""

    def __init__(self, args, config, model, data_loader, device, dtype, world_size):
        self.args, self.device, self.world_size = args, device, world_size
        self.tokens_per_step = data_loader.global_batch_size * args.seq_len
        self.logger = MetricsLogger(args.metrics_file, args.use_wandb, args.run_name, vars(args))
        num_params = sum(p.numel() for p in model.parameters())
        print(f"model: {args.model_name} | {to_readable_format(num_params)} parameters | device {device} {dtype} "
              f"| zero stage {args.zero_stage} | {len(data_loader.tokenized_dataset)} chunks of {args.seq_len + 1} "
              f"tokens", flush=True)
        # MFU counts the whole model's FLOPs whatever this rank holds, and each device's share of them.
        self.model_flops_per_token = flops_per_token(config, args.seq_len)
        self.peak_flops, peak_source = peak_flops_per_device(device, dtype, args.peak_tflops)
        self.peak_measured = peak_source.startswith("measured")
        print(f"FLOPs per token: {to_readable_format(self.model_flops_per_token)} | peak per device: "
              f"{self.peak_flops / 1e12:.3f} TFLOPs ({peak_source})", flush=True)

    def mfu(self, flops_per_device):
        """Achieved over peak, and why it is above 100% if it is. A measured peak can read low when the machine was
        busier while measuring than while training: then it is measured again, and kept if higher."""
        if flops_per_device > self.peak_flops and self.peak_measured:
            self.peak_flops = max(self.peak_flops, measure_matmul_flops(self.device, torch.float32))
        mfu = flops_per_device / self.peak_flops
        return mfu, "" if mfu <= 1 else " (above the measured peak: this CPU is shared; --peak_tflops sets it)"

    def log_step(self, step, trained_tokens, step_duration, *, loss, grad_norm, lr, moe=None):
        """moe: a mixture of experts' numbers (train.router_metrics), logged beside the others."""
        tokens_per_second = self.tokens_per_step / step_duration
        flops_per_device = tokens_per_second * self.model_flops_per_token / self.world_size  # achieved FLOPs/s
        mfu, why = self.mfu(flops_per_device)
        metrics = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": trained_tokens,
                   "tokens_per_second": tokens_per_second,
                   "tokens_per_second_per_device": tokens_per_second / self.world_size,
                   "tflops_per_device": flops_per_device / 1e12, "mfu": mfu, "memory_gb": peak_memory_gb(self.device),
                   **(moe or {})}
        aux = f" | Aux loss: {moe['aux_loss']:.4f}" if moe else ""
        print(f"Step: {step:<4d} | Loss: {loss:.4f}{aux} | Grad norm: {grad_norm:.3f} | LR: {lr:.2e} "
              f"| Global batch size: {to_readable_format(self.tokens_per_step)} "
              f"| Tokens/s: {to_readable_format(tokens_per_second)} "
              f"| Tokens/s/device: {to_readable_format(tokens_per_second / self.world_size)} "
              f"| TFLOPs/device: {flops_per_device / 1e12:.3f} | MFU: {mfu:.1%}{why} "
              f"| Tokens: {to_readable_format(trained_tokens)}/{to_readable_format(self.args.max_tokens)} "
              f"| Memory: {metrics['memory_gb']:.2f}GB", flush=True)
        self.logger.log(metrics)

    def close(self):
        self.logger.close()
