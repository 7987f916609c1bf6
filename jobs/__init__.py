"""blipbatch jobs package."""
