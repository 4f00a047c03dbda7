-- Events for an instance on a definition version the receiving replica has not loaded (a rolling
-- deploy) are parked against that instance with the version they wait for; any replica that has the
-- version re-drives them (timer loop), and past the deadline they are dead-lettered
-- `unknown_definition_version`.
ALTER TABLE sfworkflow.parked ADD COLUMN awaiting_version integer;
CREATE INDEX parked_awaiting_version_idx ON sfworkflow.parked (workflow, awaiting_version)
    WHERE awaiting_version IS NOT NULL;
