from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    # Ours first: the same DOT token view, wrapped to count reuse (see views.token).
    path("o/token/", views.token, name="token"),
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path("api/user/current", views.current_user),
    path("_test/login", views.login_consenter),
    path("_test/issue", views.issue_codes),
    path("_test/stats", views.stats),
    path("_test/reset_stats", views.reset_stats),
    path("_test/refresh_state", views.refresh_state),
]
