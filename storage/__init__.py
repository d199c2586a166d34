"""Persistence: SQLModel tables, engines and Alembic migrations, repository functions, blobs."""

# Repository functions take ``session`` keyword-only and run inside the caller's transaction:
# they flush but never commit, so a unit of work (reserve credits + insert the job) commits or
# fails as one. Wrap them in ``storage.db.transaction(factory)`` or ``factory.begin()``.
