"""stablenew_core: a Prefect-native orchestrator for Stable Diffusion WebUI pipelines."""
