"""gemcut as a fine-tuning service: OpenAI-compatible files and fine-tuning jobs on the inference server,
a job store in SQLAlchemy (SQLite or PostgreSQL), workers that claim jobs and run each as an ordinary run
folder, owners by API key, and the dashboard's static pages. See docs/service.md."""
