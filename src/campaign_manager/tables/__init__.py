"""The database tables, by domain; `campaign_manager.models` gathers them all."""
