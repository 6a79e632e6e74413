"""The aiohttp application: routes, auth middleware, problem+json errors, wire models."""
