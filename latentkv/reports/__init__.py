"""Reports that compare models side by side: `bench` (speed and memory), `sweep` (quality vs cache
size over methods and budgets), `verify` (a DeepSeek-V3 export against our runtime)."""
