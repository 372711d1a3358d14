"""Small values for tests that create users directly in a store."""

#: A syntactically valid bcrypt hash that matches no password (for users that never sign in).
PLACEHOLDER_HASH = "$2b$04$notarealhashnotarealhashnotarealhashnotarealhashnot"
