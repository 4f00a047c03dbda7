-- Retention deletes an ended instance's effect keys with it: find them by instance.
CREATE INDEX effect_instance_idx ON sfworkflow.effect (instance_id);
