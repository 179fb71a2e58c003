"""The sandbox: runs one training job under hard limits, then scores it with the trusted evaluation."""
