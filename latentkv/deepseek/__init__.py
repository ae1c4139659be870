"""The DeepSeek-V3 format: its layout (`layout`), writing a conversion as a stock checkpoint (`export`)
and reading any DeepSeek-V3 checkpoint into the latentkv runtime (`reader`)."""
