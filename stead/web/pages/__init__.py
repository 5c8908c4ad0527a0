"""The reviewers' pages, one module per area; each route goes through stead.service."""
