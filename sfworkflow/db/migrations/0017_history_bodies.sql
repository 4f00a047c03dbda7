-- The body of each external event an instance applied, as it came (history.body), so its history can be replayed
-- through another definition version (`sfworkflow check-definition`, `export-histories`, `migrate-instances
-- --dry-run`). NULL for entries that are not an external event applied, and for those written before this
-- migration. Internal events (timers, the database's answers) keep their data in `detail` as before. A nullable
-- column without a default rewrites nothing; retention deletes it with its row.
ALTER TABLE sfworkflow.history ADD COLUMN IF NOT EXISTS body bytea;
