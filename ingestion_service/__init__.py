"""Publishes validated readings to RabbitMQ with publisher confirms."""
