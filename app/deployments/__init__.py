"""From published version to served model: deployment targets that follow `current`, and merged exports.
Importing app.deployments.service registers the session listeners that send new deliveries once they commit."""
