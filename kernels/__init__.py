"""Pure, stateless, batched torch kernels shared by the CPU and GPU paths (state goes in and out explicitly)."""
